"""Killed saves: the checkpoint is never corrupt, and their temporary files are cleaned up."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.api import checkpoint as ckpt
from swiftdp.io import remove_orphan_temp_files

WIDTH = 1536  # two 1536x1536 layers: an 18 MiB checkpoint


def _run():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, WIDTH, generator=g), torch.randint(0, 2, (16,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return swiftdp.make_private(model, opt, DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                                max_grad_norm=1.0, seed=1, delta=1e-3)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_files(folder, name="ck.pt"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _save_forever(run, path, ready) -> None:
    ready.set()
    i = 0
    while True:
        run.save_checkpoint(path, extra={"i": i})
        i += 1


def test_next_save_removes_orphans_of_the_same_target_and_nothing_else(tmp_path):
    dead = _dead_pid()
    orphans = [f".ck.pt.{dead}.0123456789abcdef.tmp", ".ck.pt.k2j_9x0q.tmp"]  # current, legacy
    kept = [f".ck.pt.{os.getppid()}.0123456789abcdef.tmp",  # a running writer
            f".ck.pt.5.{dead}.0123456789abcdef.tmp",  # a temporary of target "ck.pt.5"
            f".other.pt.{dead}.0123456789abcdef.tmp", "ck.pt.tmp", "notes.txt"]
    for name in orphans + kept:
        (tmp_path / name).write_bytes(b"partial")
    dp = _run()
    dp.save_checkpoint(tmp_path / "ck.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "ck.pt"])
    assert remove_orphan_temp_files(tmp_path / "ck.pt") == []


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork() to start the saving process quickly")
def test_killed_saves_never_leave_a_corrupt_checkpoint_and_the_next_save_removes_orphans(tmp_path):
    run, reader = _run(), _run()
    ckpt.run_dataset_fingerprint(run)  # computed here, inherited by the children
    path = tmp_path / "ck.pt"
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    outcomes: list[tuple[bool, int]] = []
    # Five kills at random moments; up to five more if none has landed mid-write yet.
    while len(outcomes) < 5 or (len(outcomes) < 10 and not any(n for _, n in outcomes)):
        ready = fork.Event()
        child = fork.Process(target=_save_forever, args=(run, path, ready), daemon=True)
        child.start()
        assert ready.wait(10)
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        if path.exists():
            extra = reader.load_checkpoint(path)  # verified: never a torn or damaged file
            assert isinstance(extra["i"], int)
        outcomes.append((path.exists(), len(_temp_files(tmp_path))))
    assert any(orphans for _, orphans in outcomes), outcomes  # a kill did land mid-write
    assert any(exists for exists, _ in outcomes), outcomes
    run.save_checkpoint(path, extra={"i": -1})
    assert _temp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    assert reader.load_checkpoint(path) == {"i": -1}
