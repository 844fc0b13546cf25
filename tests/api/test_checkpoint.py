"""Checkpoint and resume: bit-for-bit continuation, atomic writes, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import CheckpointError


def _setup(seed=0, sigma=1.1):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=12), noise_multiplier=sigma,
                              max_grad_norm=1.0, seed=7, delta=1e-3)
    return dp


def _train(dp, epochs, start_epoch=0, stop_after=None, ckpt=None):
    taken = 0
    for epoch in range(start_epoch, epochs):
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
            taken += 1
            if stop_after is not None and taken == stop_after:
                dp.save_checkpoint(ckpt, extra={"epoch": epoch})
                return
    return


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    full = _setup()
    _train(full, epochs=3)
    part = _setup()
    path = tmp_path / "ck.pt"
    _train(part, epochs=3, stop_after=7, ckpt=path)  # mid-epoch (5 steps per epoch)
    resumed = _setup(seed=123)  # different init: everything must come from the checkpoint
    extra = resumed.load_checkpoint(path)
    assert extra == {"epoch": 1}
    _train(resumed, epochs=3, start_epoch=extra["epoch"])
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.steps == full.steps == 15
    assert resumed.epsilon() == full.epsilon()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    dp = _setup()
    path = tmp_path / "ck.pt"
    _train(dp, epochs=1, stop_after=2, ckpt=path)
    good = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        dp.save_checkpoint(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        _setup().load_checkpoint(path)


def test_checkpoint_of_a_different_run_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    _train(_setup(), epochs=1, stop_after=1, ckpt=path)
    with pytest.raises(CheckpointError, match="noise_multiplier"):
        _setup(sigma=2.0).load_checkpoint(path)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _setup().load_checkpoint(tmp_path / "nope.pt")
