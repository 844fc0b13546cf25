"""`swiftdp train` end to end on a tiny configuration: outputs, baseline, config files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from swiftdp.api.checkpoint import read as read_checkpoint
from swiftdp.cli.main import main

TINY = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--seed", "0",
        "--accountant", "rdp",
        "--quiet"]


def test_tiny_private_run_writes_the_whole_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for key in ("test accuracy", "epsilon", "delta", "sigma", "sampling rate", "steps",
                "clip norm", "wall time"):
        assert key in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    (epoch,) = metrics["epochs"]
    assert set(epoch) >= {"epoch", "loss", "train_accuracy", "test_accuracy", "epsilon", "steps"}
    assert epoch["steps"] == 5  # floor(1438 / 256) Poisson steps
    assert 0 < epoch["epsilon"] <= 3.0
    assert metrics["final"]["epsilon"] == epoch["epsilon"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["dataset"] == "digits" and config["epochs"] == 1 and config["seed"] == 0
    assert config["derived"]["noise_multiplier"] > 0
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["extra"]["epoch"] == 1
    final = torch.load(out / "model.pt", weights_only=False)
    assert final["model"] == "cnn" and "classifier.2.weight" in final["state_dict"]


def test_final_model_file_rebuilds_the_evaluated_model(tmp_path):
    from swiftdp.data import load_dataset
    from swiftdp.models import build_model

    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    saved = torch.load(out / "model.pt", weights_only=False)
    model = build_model(saved["model"], tuple(saved["input_shape"]), saved["num_classes"],
                        saved["model_size"])
    model.load_state_dict(saved["state_dict"])
    test = load_dataset("digits").test
    with torch.no_grad():
        acc = (model.eval()(test.x).argmax(1) == test.y).float().mean().item()
    reported = json.loads((out / "metrics.json").read_text())["final"]["test_accuracy"]
    assert acc == pytest.approx(reported, abs=1e-6)


def test_non_private_baseline_runs_the_same_recipe_without_dp(tmp_path, capsys):
    out = tmp_path / "np"
    assert main([*TINY, "--non-private", "--out", str(out)]) == 0
    assert "non-private" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["private"] is False
    assert metrics["epochs"][0]["epsilon"] == float("inf")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_sets_options_and_the_command_line_wins(tmp_path, suffix):
    cfg = tmp_path / f"opts{suffix}"
    if suffix == ".yaml":
        cfg.write_text("dataset: digits\nepochs: 1\nbatch-size: 256\nlr: 2.0\nseed: 3\n"
                       "accountant: rdp\n")
    else:
        cfg.write_text('dataset = "digits"\nepochs = 1\nbatch_size = 256\nlr = 2.0\nseed = 3\n'
                       'accountant = "rdp"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--lr", "1.5", "--quiet", "--out", str(out)]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == 1.5 and resolved["seed"] == 3 and resolved["batch_size"] == 256


def test_a_run_config_starts_an_identical_new_run(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.yaml"), "--quiet",
                 "--out", str(second)]) == 0
    a = json.loads((first / "metrics.json").read_text())["epochs"]
    b = json.loads((second / "metrics.json").read_text())["epochs"]
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]


def test_console_script_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "swiftdp"
    ok = subprocess.run([str(exe), *TINY, "--out", str(tmp_path / "run")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "test accuracy" in ok.stdout
    bad = subprocess.run([str(exe), "train", "--dataset", "imagenet"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("swiftdp: error:")
