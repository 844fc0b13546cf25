"""`swiftdp train` writes privacy.json and privacy.md: what the run's (ε, δ) is and rests on."""

from __future__ import annotations

import json
import math

import pytest

import swiftdp.cli.report as report_module
import swiftdp.cli.train as train_module
from swiftdp.accounting import AccountingSegment
from swiftdp.cli.main import main
from swiftdp.cli.report import epsilon_by_accountant

ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "256",
        "--seed", "0", "--quiet"]


def _strict_json(path):
    """The JSON document at ``path``, refusing the non-standard NaN and Infinity."""
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}, which JSON does not allow")

    return json.loads(path.read_text(), parse_constant=refuse)


def _read(out):
    # metrics.json writes a non-private run's ε as Infinity; privacy.json never does.
    return (_strict_json(out / "privacy.json"), (out / "privacy.md").read_text(),
            json.loads((out / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_private_run_reports_the_epsilon_of_its_accountant_and_of_the_others(private_run):
    report, md, metrics = _read(private_run)
    final = metrics["final"]
    assert report["private"] is True and report["audit"] is None
    assert report["accountant"] == "pld" and report["epsilon"] == final["epsilon"]
    assert report["delta"] == final["delta"] == 1e-5 and not report["epsilon_infinite"]
    eps = {name: e["epsilon"] for name, e in report["epsilon_by_accountant"].items()}
    assert eps["pld"] == final["epsilon"]
    assert 0.5 < eps["pld"] <= 3.0  # calibrated to the default target ε = 3
    assert eps["pld"] <= eps["rdp"] < 1.5 * eps["pld"]  # RDP is the looser bound
    assert eps["prv"] == pytest.approx(eps["pld"], rel=0.05)
    assert 0 < eps["gdp"] and report["epsilon_by_accountant"]["gdp"]["upper_bound"] is False
    assert "approximation, not an upper bound" in md
    assert "audit: not run" in md and "| ε (RDP) |" in md


def test_private_run_reports_sigma_q_steps_and_the_mechanism_of_its_metrics(private_run):
    report, md, metrics = _read(private_run)
    final = metrics["final"]
    assert report["noise"]["first_noise_multiplier"] == final["noise_multiplier"]
    assert report["noise"]["calibrated"] is True and report["noise"]["noise_schedule"] is None
    assert report["sampling"]["sample_rate"] == final["sample_rate"]
    assert report["steps"] == final["steps"] == sum(s["steps"] for s in report["history"]) == 5
    assert report["sampling"]["expected_batch_size"] == 256 and report["dataset_size"] == 1438
    assert report["clipping"]["first_max_grad_norm"] == final["max_grad_norm"] == 0.1
    assert report["clipping"]["style"] == "flat" and report["clipping"]["groups"] is None
    assert report["mechanism"] == {
        "algorithm": "DP-SGD", "noise": "gaussian", "sampling": "poisson",
        "neighbours": "add/remove one example", "privacy_unit": "one example (one image)",
        "augmult": 1, "augment": "auto", "views_clipped_together": False}
    checks = report["assumptions"]
    assert checks["independence_check"]["enabled"] and checks["loss_check"]["enabled"]
    assert report["noise_generator"]["seeded"] is True and report["processes"] == 1
    assert "seed" not in report["noise_generator"]  # a seed regenerates the noise
    assert f"{final['noise_multiplier']:.4f}" in md and "Privacy guarantees and their" in md


def test_schedules_adaptive_per_layer_clipping_and_augmult_are_recorded(tmp_path):
    out = tmp_path / "run"
    assert main([*ARGS, "--noise-multiplier", "1.5", "--noise-schedule", "exp:0.9",
                 "--adaptive-clipping", "0.5", "--clip-per-layer", "--augmult", "2",
                 "--out", str(out)]) == 0
    report, md, metrics = _read(out)
    final, noise, clip = metrics["final"], report["noise"], report["clipping"]
    assert noise["noise_schedule"] == "exp:0.9" and noise["calibrated"] is False
    assert noise["first_noise_multiplier"] == final["first_noise_multiplier"] == 1.5
    assert noise["last_noise_multiplier"] == final["noise_multiplier"] < 1.5
    assert report["epsilon"] == final["epsilon"] <= 3.0
    assert len(report["history"]) == 5  # one σ per step
    adaptive = clip["adaptive"]
    assert adaptive["spec"] == "0.5:0.2" and adaptive["count_noise"] > 0
    assert adaptive["last_gradient_noise_multiplier"] > noise["last_noise_multiplier"]
    assert clip["last_max_grad_norm"] == final["max_grad_norm"] != clip["first_max_grad_norm"]
    assert clip["per_layer"] is True and clip["num_groups"] == len(clip["groups"]) == 2
    assert math.hypot(*(g["first"] for g in clip["groups"])) == pytest.approx(0.1)
    assert report["mechanism"]["augmult"] == 2 and report["mechanism"]["views_clipped_together"]
    for text in ("`--noise-schedule exp:0.9`", "σ_g", "`--clip-per-layer`: 2 groups",
                 "`--adaptive-clipping 0.5:0.2`", "2 augmented views are clipped together"):
        assert text in md


def test_non_private_run_says_that_no_guarantee_holds(tmp_path):
    out = tmp_path / "run"
    assert main([*ARGS, "--non-private", "--out", str(out)]) == 0
    report, md, _ = _read(out)
    assert report["private"] is False and report["epsilon"] is None
    assert report["epsilon_infinite"] is True and report["audit"] is None
    assert report["steps"] > 0 and "ε = ∞" in report["guarantee"]
    assert "no privacy guarantee" in md and "audit: not run" in md


def test_resumed_run_rewrites_the_report_with_the_total_steps(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupt(step):
        if step == 7:  # in epoch 2 (5 steps per epoch)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_after_step", interrupt)
    args = [*ARGS, "--epochs", "2", "--clip-schedule", "step:3:0.5", "--out", str(out)]
    assert main(args) == 130
    assert not (out / "privacy.json").exists()  # written when the run finishes
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    report, md, metrics = _read(out)
    assert report["steps"] == metrics["final"]["steps"] == 10 and report["epochs"] == 2
    assert sum(s["steps"] for s in report["history"]) == 10
    assert report["epsilon"] == metrics["final"]["epsilon"]
    assert report["clipping"]["clip_schedule"] == "step:3:0.5"
    assert report["clipping"]["last_max_grad_norm"] == pytest.approx(0.1 * 0.5 ** 3)
    assert "10 (2 epochs)" in md and "`--clip-schedule step:3:0.5`" in md


def test_another_accountant_too_slow_or_failing_is_recorded_not_raised(monkeypatch):
    history = tuple(AccountingSegment(1.0 + i / 1000, 0.01, 1) for i in range(400))
    slow = epsilon_by_accountant(history, 1e-5, "gdp", 1.0)
    assert slow["gdp"]["epsilon"] == 1.0
    for name in ("pld", "prv", "rdp"):
        assert slow[name]["epsilon"] is None and "not computed" in slow[name]["note"]

    def broken(name, history, delta):
        raise ValueError("no convergence")

    monkeypatch.setattr(report_module, "_recompute", broken)
    failed = epsilon_by_accountant(history[:1], 1e-5, "pld", 0.5)
    assert failed["pld"]["epsilon"] == 0.5
    assert failed["rdp"]["note"] == "failed: ValueError: no convergence"


def test_a_secure_run_reports_that_no_generator_state_is_kept(tmp_path):
    out = tmp_path / "secure"
    assert main([*ARGS, "--secure", "--out", str(out)]) == 0
    doc, text, _ = _read(out)
    assert doc["noise_generator"]["secure"] is True
    assert doc["noise_generator"]["checkpoint_holds_generator_state"] is False
    assert "--secure" in text


def test_audit_replays_the_runs_mechanism_and_fills_the_report(tmp_path):
    out = tmp_path / "audited"
    assert main([*ARGS, "--audit", "--out", str(out)]) == 0
    doc, text, metrics = _read(out)
    a = doc["audit"]
    assert a["violated"] is False and a["canaries"] == 1000
    assert a["steps"] == doc["steps"]
    assert a["epsilon_lower_bound_fdp"] < a["epsilon_claimed"]
    assert a["epsilon_claimed"] == pytest.approx(metrics["final"]["epsilon"], rel=0.05)
    assert "audit: empirical lower bound" in text and (out / "audit.png").exists()


def test_audit_with_a_moving_sigma_is_refused(tmp_path, capsys):
    assert main([*ARGS, "--audit", "--noise-multiplier", "1", "--noise-schedule", "exp:0.9",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--audit" in capsys.readouterr().err
