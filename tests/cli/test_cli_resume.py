"""Ctrl-C during `swiftdp train` and `--resume`: the run continues as if never stopped."""

from __future__ import annotations

import json

import pytest
import torch

import swiftdp.cli.train as train_module
from swiftdp.api.checkpoint import read as read_checkpoint
from swiftdp.cli.main import main

ARGS = ["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "256", "--seed", "5",
        "--accountant", "rdp",
        "--quiet"]


def _interrupt_after(monkeypatch, n):
    def hook(step):
        if step == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_after_step", hook)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*ARGS, "--out", str(full)]) == 0
    _interrupt_after(monkeypatch, 7)  # in epoch 2 (5 steps per epoch)
    assert main([*ARGS, "--out", str(part)]) == 130
    err = capsys.readouterr().err
    assert f"--resume {part}" in err
    saved = read_checkpoint(part / "checkpoint.pt")
    assert saved["extra"]["epoch"] == 1 and saved["accountant"]["history"][0]["steps"] == 5
    monkeypatch.undo()
    assert main(["train", "--resume", str(part), "--quiet"]) == 0
    m_full = json.loads((full / "metrics.json").read_text())
    m_part = json.loads((part / "metrics.json").read_text())
    assert m_part["final"]["epsilon"] == m_full["final"]["epsilon"]
    assert m_part["final"]["steps"] == m_full["final"]["steps"] == 15
    assert [e["test_accuracy"] for e in m_part["epochs"]] == \
        [e["test_accuracy"] for e in m_full["epochs"]]
    a = torch.load(full / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_in_the_first_epoch_leaves_a_resumable_epoch_zero_checkpoint(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    assert main([*ARGS, "--epochs", "1", "--out", str(out)]) == 130
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint.pt")["extra"]["epoch"] == 0
    assert main(["train", "--resume", str(out), "--quiet", "--threads", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["steps"] == 5


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert main([*ARGS, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main([*ARGS, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("swiftdp: error:") and err.count("\n") == 1, err
    return err


def test_resume_with_conflicting_option_is_refused(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--lr", "0.5"]) == 2
    assert "--lr" in _one_error_line(capsys)


def test_resume_of_folder_without_checkpoint_is_refused(finished_run, tmp_path, capsys):
    empty = tmp_path / "copy"
    empty.mkdir()
    (empty / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    assert main(["train", "--resume", str(empty)]) == 2
    assert "checkpoint" in _one_error_line(capsys)


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    _one_error_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys)


def test_resume_with_a_corrupt_checkpoint_is_refused(finished_run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(bad)]) == 2
    assert "corrupt" in _one_error_line(capsys)


def test_resume_of_a_checkpoint_from_another_run_is_refused(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main([*ARGS, "--epochs", "1", "--epsilon", "5", "--out", str(other)]) == 0
    capsys.readouterr()
    (other / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes())
    assert main(["train", "--resume", str(other)]) == 2
    assert "different run" in _one_error_line(capsys)

