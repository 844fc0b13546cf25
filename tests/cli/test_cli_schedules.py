"""Short `swiftdp train` runs with schedules of σ and C, adaptive clipping, EMA/Polyak and GDP.

Each run is checked against references computed here from the outside: the
σ of every step against the schedule's formula, ε against a fresh
accountant fed that history, the saved and evaluated weights against an EMA
or a Polyak mean of the iterates the training went through (recorded by a
ParameterAverage subclass), and a resumed run against the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from torch import Tensor, nn

import swiftdp.cli.privacy as privacy_module
import swiftdp.cli.train as train_module
from swiftdp.accounting import PrivacyAccountant
from swiftdp.api.checkpoint import read as read_checkpoint
from swiftdp.averaging import ParameterAverage
from swiftdp.cli.main import main
from swiftdp.data import load_dataset
from swiftdp.models import build_model

N_TRAIN, BATCH, DELTA = 1438, 256, 1e-5  # the digits' training split: 5 Poisson steps an epoch
Q = BATCH / N_TRAIN
BASE = ["train", "--dataset", "digits", "--model", "mlp", "--batch-size", str(BATCH),
        "--seed", "1", "--accountant", "gdp", "--quiet"]
FEATURES = ["--noise-multiplier", "2", "--noise-schedule", "step:4:0.8", "--adaptive-clipping",
            "0.5:0.5", "--ema", "0.8", "--ema-warmup"]
SCHEDULED = [*BASE, "--epochs", "2", *FEATURES]


def _sigma(t: int) -> float:
    return 2.0 * 0.8 ** (t // 4)  # step:4:0.8 from σ = 2


class RecordingAverage(ParameterAverage):
    """A ParameterAverage that keeps every iterate it saw: θ_0, then θ_n at each update."""

    iterates: ClassVar[list[dict[str, Tensor]]] = []

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        RecordingAverage.iterates = [_weights(model)]

    def update(self) -> None:
        super().update()
        RecordingAverage.iterates.append(_weights(self.model))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(argv: list[str], out: Path) -> tuple[list[dict[str, Tensor]], str]:
    """Run `swiftdp train`; returns the iterates and stdout."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(privacy_module, "ParameterAverage", RecordingAverage)
        assert main([*argv, "--out", str(out)]) == 0
    return list(RecordingAverage.iterates), stdout.getvalue()


def _config(out: Path) -> dict[str, Any]:
    return yaml.safe_load((out / "config.yaml").read_text())  # type: ignore[no-any-return]


def _metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


def _model_file(out: Path) -> dict[str, Tensor]:
    return torch.load(out / "model.pt", weights_only=False)["state_dict"]  # type: ignore[no-any-return]


def _segments(sigmas: list[float]) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    for s in sigmas:
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def _history(out: Path) -> list[tuple[float, int]]:
    saved = read_checkpoint(out / "checkpoint.pt")["accountant"]["history"]
    return [(h["noise_multiplier"], h["steps"]) for h in saved]


def _gdp_epsilon(sigmas: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GDP's: an approximation
        accountant = PrivacyAccountant("gdp")
    for s in sigmas:
        accountant.step(s, Q, 1)
    return accountant.epsilon(DELTA)


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Tensor]], str]:
    out = tmp_path_factory.mktemp("scheduled") / "run"
    iterates, stdout = _run(SCHEDULED, out)
    return out, iterates, stdout


def test_schedule_adaptive_clipping_and_ema_are_in_the_run_config_and_the_report(scheduled):
    out, _, stdout = scheduled
    config = _config(out)
    assert {k: config[k] for k in ("noise_multiplier", "noise_schedule", "adaptive_clipping",
                                   "clip_schedule", "ema", "ema_warmup", "polyak",
                                   "accountant")} == {
        "noise_multiplier": 2.0, "noise_schedule": "step:4:0.8", "adaptive_clipping": "0.5:0.5",
        "clip_schedule": None, "ema": 0.8, "ema_warmup": True, "polyak": None,
        "accountant": "gdp"}
    derived = config["derived"]
    assert derived["noise_multiplier"] == 2.0 and derived["planned_steps"] == 10
    assert derived["planned_last_noise_multiplier"] == _sigma(9)
    assert derived["adaptive_count_noise"] == BATCH / 20  # the library's default, q·N/20
    assert derived["gradient_noise_multiplier"] == pytest.approx((2.0 ** -2 - 25.6 ** -2) ** -0.5)
    final = _metrics(out)["final"]
    assert (final["first_noise_multiplier"], final["noise_multiplier"]) == (2.0, _sigma(9))
    assert final["noise_schedule"] == "step:4:0.8" and final["accountant"] == "gdp"
    assert final["adaptive_clipping"] == {"target_quantile": 0.5, "learning_rate": 0.5,
                                          "count_noise": BATCH / 20}
    assert final["averaging"] == {"kind": "ema", "decay": 0.8, "warmup": True, "start_step": 0,
                                  "updates": 10}
    for text in ("2.0000 at the first step, 1.2800 at the last (--noise-schedule step:4:0.8)",
                 "adaptive: quantile 0.5, lr 0.5, count noise 12.8", "EMA, decay 0.8, warmup",
                 "GDP is a central-limit approximation"):
        assert text in stdout, stdout


def test_sigma_follows_the_noise_schedule_and_epsilon_is_the_accountants(scheduled):
    out, _, _ = scheduled
    sigmas = [_sigma(t) for t in range(10)]
    assert _history(out) == _segments(sigmas) == [(2.0, 4), (1.6, 4), (_sigma(9), 2)]
    metrics = _metrics(out)
    assert [e["noise_multiplier"] for e in metrics["epochs"]] == [_sigma(4), _sigma(9)]
    assert metrics["final"]["epsilon"] == pytest.approx(_gdp_epsilon(sigmas), rel=1e-12)
    assert metrics["final"]["epsilon"] <= 3.0


def test_adaptive_clipping_moved_the_clip_norm(scheduled):
    out, _, _ = scheduled
    clips = [e["max_grad_norm"] for e in _metrics(out)["epochs"]]
    saved = read_checkpoint(out / "checkpoint.pt")["optimizer"]
    assert saved["initial_max_grad_norm"] == 0.1
    # C = 0.1 is far below the per-example norms: few are within it, so C grows,
    # by exp(η·(γ − b̃)) <= exp(0.25) a step while none is (0.1 · 1.284^5 = 0.35).
    assert 0.2 < clips[0] < clips[1] != saved["max_grad_norm"]


def test_evaluation_and_model_file_use_the_ema_of_the_iterates(scheduled):
    out, iterates, _ = scheduled
    assert len(iterates) == 11  # θ_0 and one per step
    reference = dict(iterates[0])
    for n in range(1, 11):
        decay = min(0.8, n / (9 + n))  # warmup: (1 + t) / (10 + t), t = n - 1
        reference = {k: decay * v + (1 - decay) * iterates[n][k] for k, v in reference.items()}
    saved = _model_file(out)
    for k, v in reference.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6)
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert all(torch.equal(saved[k], v) for k, v in ckpt["extra"]["average"]["averages"].items())
    assert not torch.equal(saved["net.1.weight"], ckpt["model"]["net.1.weight"])  # not θ_10
    file = torch.load(out / "model.pt", weights_only=False)
    model = build_model(file["model"], tuple(file["input_shape"]), file["num_classes"],
                        file["model_size"])
    model.load_state_dict(saved)
    test = load_dataset("digits").test
    with torch.no_grad():
        accuracy = (model.eval()(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy == pytest.approx(_metrics(out)["final"]["test_accuracy"], abs=1e-6)


def test_resume_with_ema_and_schedules_continues_as_if_never_stopped(scheduled, tmp_path,
                                                                     monkeypatch, capsys):
    full = scheduled[0]
    part = tmp_path / "part"

    def interrupt(step: int) -> None:
        if step == 7:  # in epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_after_step", interrupt)
    assert main([*SCHEDULED, "--out", str(part)]) == 130
    monkeypatch.undo()
    saved = read_checkpoint(part / "checkpoint.pt")
    assert saved["extra"]["epoch"] == 1 and saved["extra"]["average"]["num_updates"] == 5
    assert _history(part) == [(2.0, 4), (1.6, 1)]
    assert saved["optimizer"]["noise_multiplier"] == _sigma(5)  # the next step's
    assert saved["optimizer"]["max_grad_norm"] != 0.1  # adapted
    capsys.readouterr()
    assert main(["train", "--resume", str(part), "--noise-schedule", "exp:0.9"]) == 2
    assert "--noise-schedule 'exp:0.9' (the run has 'step:4:0.8')" in capsys.readouterr().err

    # The same options may be repeated, spelt any way that reads the same.
    assert main(["train", "--resume", str(part), "--noise-schedule", "step:4:0.80",
                 "--quiet"]) == 0
    strip = [{k: v for k, v in e.items() if k != "elapsed_s"} for e in _metrics(full)["epochs"]]
    assert [{k: v for k, v in e.items() if k != "elapsed_s"}
            for e in _metrics(part)["epochs"]] == strip
    assert _history(part) == _history(full)
    a, b = read_checkpoint(full / "checkpoint.pt"), read_checkpoint(part / "checkpoint.pt")
    assert a["optimizer"]["max_grad_norm"] == b["optimizer"]["max_grad_norm"]
    assert a["extra"]["average"]["num_updates"] == b["extra"]["average"]["num_updates"] == 10
    full_model, part_model = _model_file(full), _model_file(part)
    assert all(torch.equal(full_model[k], part_model[k]) for k in full_model)
    assert _metrics(part)["final"]["epsilon"] == _metrics(full)["final"]["epsilon"]


def test_fixed_sigma_clip_schedule_and_polyak_under_gdp(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*BASE, "--epochs", "1", "--noise-multiplier", "1.5", "--max-grad-norm", "0.2",
            "--clip-schedule", "step:2:0.5", "--polyak", "2"]
    iterates, stdout = _run(argv, out)
    assert "accountant 'gdp'" in capsys.readouterr().err  # its warning: an approximation
    config = _config(out)
    assert (config["noise_multiplier"], config["clip_schedule"], config["polyak"],
            config["ema"], config["accountant"]) == (1.5, "step:2:0.5", 2, 0.0, "gdp")
    assert config["derived"]["noise_multiplier"] == 1.5
    assert config["derived"]["planned_last_max_grad_norm"] == 0.2 * 0.5 ** 2  # step 4
    # One σ, given: every step's, and ε is the accountant's for it.
    assert _history(out) == [(1.5, 5)]
    final = _metrics(out)["final"]
    assert final["epsilon"] == pytest.approx(_gdp_epsilon([1.5] * 5), rel=1e-12)
    # C followed the schedule: 0.2, 0.2, 0.1, 0.1, 0.05; the next step's is 0.05 too.
    assert (final["first_max_grad_norm"], final["max_grad_norm"]) == (0.2, 0.05)
    assert read_checkpoint(out / "checkpoint.pt")["optimizer"]["max_grad_norm"] == 0.05
    # The saved (and evaluated) weights: the mean of θ_3, θ_4, θ_5.
    saved = _model_file(out)
    for k in iterates[0]:
        mean = sum(iterates[n][k] for n in (3, 4, 5)) / 3
        torch.testing.assert_close(saved[k], mean, rtol=0, atol=1e-6)
    for text in ("1.5000 (--noise-multiplier)", "budget 3, GDP accountant",
                 "0.2 at the first step, 0.05 at the last (flat, --clip-schedule step:2:0.5)",
                 "Polyak mean of the weights after step 2"):
        assert text in stdout, stdout


def test_ema_zero_evaluates_and_saves_the_last_weights(tmp_path):
    out = tmp_path / "run"
    _, stdout = _run([*BASE, "--epochs", "1", "--non-private", "--ema", "0"], out)
    trained = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    saved = _model_file(out)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    assert _metrics(out)["final"]["averaging"] is None
    assert "none (the last weights)" in stdout


def test_two_processes_follow_the_schedule_adapt_c_and_save_the_average(tmp_path):
    # torchrun relaunches `swiftdp train` with the same arguments: every rank reads them.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "swiftdp.cli", *BASE, "--epochs", "1",
                           *FEATURES, "--nproc", "2",
                           "--threads", "1", "--out", str(out)],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = _config(out)
    assert (config["nproc"], config["noise_schedule"], config["adaptive_clipping"],
            config["ema"]) == (2, "step:4:0.8", "0.5:0.5", 0.8)
    sigmas = [_sigma(t) for t in range(5)]
    assert _history(out) == _segments(sigmas)
    final = _metrics(out)["final"]
    assert final["epsilon"] == pytest.approx(_gdp_epsilon(sigmas), rel=1e-12)
    assert final["max_grad_norm"] > final["first_max_grad_norm"] == 0.1  # adapted on 2 ranks
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["extra"]["average"]["num_updates"] == 5
    saved = _model_file(out)
    assert all(torch.equal(saved[k], v) for k, v in ckpt["extra"]["average"]["averages"].items())
