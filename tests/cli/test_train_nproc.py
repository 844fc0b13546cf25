"""`swiftdp train --nproc N`: the CLI's run data-parallel on N local gloo processes (torchrun).

Against independent references: the 2-process run writes the files of the
1-process run, and both report the ε that a fresh PrivacyAccountant gives for
the same σ, q = batch / N and number of steps; a Ctrl-C stops every process
with exit code 130 and leaves a checkpoint that resumes on one process to the
planned steps and ε. Bad values and combinations are refused before anything
is launched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from swiftdp.accounting import PrivacyAccountant
from swiftdp.api.checkpoint import read as read_checkpoint
from swiftdp.cli.main import main

N_TRAIN, BATCH, DELTA = 1438, 256, 1e-5  # the digits' training split; 5 Poisson steps an epoch
ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--batch-size", str(BATCH),
        "--seed", "0", "--accountant", "rdp", "--quiet"]
FILES = {"config.yaml", "metrics.json", "checkpoint.pt", "model.pt", "accuracy_vs_epsilon.png",
         "privacy.json", "privacy.md"}


def _swiftdp(*args: str) -> list[str]:
    return [sys.executable, "-m", "swiftdp.cli", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _epsilon(sigma: float, steps: int) -> float:
    acc = PrivacyAccountant("rdp")
    acc.step(sigma, BATCH / N_TRAIN, steps)
    return acc.epsilon(DELTA)


def test_two_processes_write_the_one_process_outputs_and_epsilon(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*ARGS, "--epochs", "1", "--threads", "1", "--out", str(one)]) == 0
    capsys.readouterr()
    proc = subprocess.run(_swiftdp(*ARGS, "--epochs", "1", "--threads", "1", "--nproc", "2",
                                   "--out", str(two)),
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} == FILES
    assert proc.stdout.count("test accuracy") == 1  # rank 0 reports, rank 1 is silent
    assert "rank 1" not in proc.stdout + proc.stderr

    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in (one, two)]
    assert configs[0]["nproc"] == 1 and configs[1]["nproc"] == 2
    assert {k: v for k, v in configs[0].items() if k != "nproc"} == \
        {k: v for k, v in configs[1].items() if k != "nproc"}  # derived σ, q, steps included
    sigma = configs[0]["derived"]["noise_multiplier"]
    assert configs[1]["derived"]["sample_rate"] == BATCH / N_TRAIN

    m_one, m_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert [set(e) for e in m_one["epochs"]] == [set(e) for e in m_two["epochs"]]
    assert m_two["final"]["steps"] == m_one["final"]["steps"] == 5
    assert m_two["final"]["noise_multiplier"] == m_one["final"]["noise_multiplier"] == sigma
    want = _epsilon(sigma, 5)
    assert m_two["final"]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert m_one["final"]["epsilon"] == pytest.approx(want, rel=1e-9)
    reports = [json.loads((d / "privacy.json").read_text()) for d in (one, two)]
    assert [r["processes"] for r in reports] == [1, 2]
    assert reports[1]["epsilon"] == m_two["final"]["epsilon"]
    assert f"{want:.4f}" in proc.stdout
    assert 0.0 < m_two["epochs"][0]["test_accuracy"] <= 1.0

    assert read_checkpoint(two / "checkpoint.pt")["extra"]["epoch"] == 1
    a = torch.load(one / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(two / "model.pt", weights_only=False)["state_dict"]
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize(("extra", "message"), [
    (["--nproc", "0"], "--nproc expects an integer >= 1, got 0."),
    (["--nproc", "-3"], "--nproc expects an integer >= 1, got -3."),
    (["--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
    (["--nproc", "2", "--non-private"], "--non-private cannot run on --nproc 2 processes"),
    (["--nproc", "2", "--device", "cuda"], "--device cuda cannot run on --nproc 2 processes"),
])
def test_bad_nproc_is_refused_before_anything_runs(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main([*ARGS, "--epochs", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swiftdp: error:") and message in err, err
    assert not out.exists()


def test_bad_nproc_in_a_config_file_is_refused(tmp_path, capsys):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("nproc: 0\n")
    assert main([*ARGS, "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "opts.yaml: nproc expects an integer >= 1, got 0." in capsys.readouterr().err


def test_nproc_that_contradicts_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main([*ARGS, "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--nproc 2, but torchrun started 3 processes" in err, err


def test_a_failing_rank_exits_non_zero_with_its_message(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        _swiftdp("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "missing"),
                 "--nproc", "2", "--quiet", "--out", str(out)),
        env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "swiftdp (rank 0): error:" in proc.stderr and "missing" in proc.stderr
    assert "swiftdp: error: the 2-process run failed" in proc.stderr.splitlines()[-1]
    assert not out.exists()  # created for the run, left empty: removed


def _interrupted_run(out: Path, epochs: int) -> tuple[int, str]:
    # A shell running the suite in the background passes SIGINT on as ignored;
    # the child gets the default disposition, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(
        _swiftdp(*ARGS, "--epochs", str(epochs), "--nproc", "2", "--out", str(out)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.json"
        if metrics.exists() and json.loads(metrics.read_text())["epochs"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_stops_every_process_and_the_checkpoint_resumes_on_one(tmp_path, capsys):
    out, epochs = tmp_path / "run", 6
    code, err = _interrupted_run(out, epochs)
    assert code == 130, err[-3000:]
    assert f"--resume {out}" in err.splitlines()[-1]
    saved = read_checkpoint(out / "checkpoint.pt")
    assert 1 <= saved["extra"]["epoch"] < epochs
    sigma = yaml.safe_load((out / "config.yaml").read_text())["derived"]["noise_multiplier"]

    assert main(["train", "--resume", str(out), "--nproc", "1", "--threads", "1",
                 "--quiet"]) == 0, capsys.readouterr().err
    final = json.loads((out / "metrics.json").read_text())
    assert final["final"]["steps"] == epochs * 5
    assert [e["epoch"] for e in final["epochs"]] == list(range(1, epochs + 1))
    assert final["final"]["epsilon"] == pytest.approx(_epsilon(sigma, epochs * 5), rel=1e-9)
    assert (out / "model.pt").is_file()
