"""Checkpoint and resume: bit-for-bit continuation, atomic writes, format, refusals."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.api import checkpoint as ckpt
from swiftdp.errors import CheckpointError, InvalidArgumentError


def _setup(seed=0, sigma=1.1, hidden=7):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 3))
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


def test_version_1_checkpoint_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "swiftdp-checkpoint", "version": 1, "model": {}}, path)  # the v1 layout
    with pytest.raises(CheckpointError, match="version-1 format") as info:
        _setup().load_checkpoint(path)
    assert f"reads version {ckpt.VERSION}" in str(info.value)


def test_checkpoint_of_a_later_version_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    _train(_setup(), epochs=1, stop_after=1, ckpt=path)
    data = path.read_bytes()
    header = json.loads(data[:ckpt.HEADER_SIZE])
    header["version"] = ckpt.VERSION + 1
    text = json.dumps(header, separators=(",", ":")).encode().ljust(ckpt.HEADER_SIZE - 1) + b"\n"
    path.write_bytes(text + data[ckpt.HEADER_SIZE:])
    with pytest.raises(CheckpointError, match=f"has version {ckpt.VERSION + 1}"):
        _setup().load_checkpoint(path)


def test_file_starts_with_the_documented_header_then_the_torch_payload(tmp_path):
    path = tmp_path / "ck.pt"
    _train(_setup(), epochs=1, stop_after=1, ckpt=path)
    data = path.read_bytes()
    header = json.loads(data[:ckpt.HEADER_SIZE])
    payload = data[ckpt.HEADER_SIZE:]
    assert header == {"format": "swiftdp-checkpoint", "version": ckpt.VERSION,
                      "payload_bytes": len(payload),
                      "payload_sha256": hashlib.sha256(payload).hexdigest()}
    assert data[ckpt.HEADER_SIZE - 1:ckpt.HEADER_SIZE] == b"\n"
    obj = torch.load(io.BytesIO(payload), weights_only=True)  # no pickled code needed
    assert obj["extra"] == {"epoch": 0} and obj["accountant"]["history"][0]["steps"] == 1


def test_extra_that_would_need_unpickling_is_refused_at_save_and_nothing_is_written(tmp_path):
    dp = _setup()
    path = tmp_path / "ck.pt"
    with pytest.raises(InvalidArgumentError, match=r"`extra\['stats'\]\['loss'\]` is a numpy"):
        dp.save_checkpoint(path, extra={"stats": {"loss": np.float64(0.5)}})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_another_model_is_refused_and_the_run_is_unchanged(tmp_path):
    path = tmp_path / "ck.pt"
    _train(_setup(), epochs=1, stop_after=3, ckpt=path)
    other = _setup(hidden=8)
    _train(other, epochs=1, stop_after=1, ckpt=tmp_path / "other.pt")
    before = [p.detach().clone() for p in other.model.parameters()]
    optimizer_before = other.optimizer.state_dict()
    with pytest.raises(CheckpointError, match="does not match the model"):
        other.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters(), strict=True))
    assert other.steps == 1 and other.optimizer.steps_taken == 1
    assert torch.equal(other.optimizer.state_dict()["noise_generator"],
                       optimizer_before["noise_generator"])


def test_a_noise_schedule_resumes_with_the_scheduled_sigma(tmp_path):
    path = tmp_path / "ck.pt"
    run = _setup()
    start = run.privacy.noise_multiplier
    it = iter(run.data_loader)
    for sigma in (start, 2 * start):  # a schedule: σ doubles after the first step
        run.set_noise_multiplier(sigma)
        x, y = next(it)
        F.cross_entropy(run.model(x), y).backward()
        run.optimizer.step()
    run.save_checkpoint(path)
    resumed = _setup()  # the run's configuration: it started at σ = start
    resumed.load_checkpoint(path)
    assert resumed.privacy.noise_multiplier == 2 * start
    assert [s.noise_multiplier for s in resumed.accountant.history] == [start, 2 * start]
    with pytest.raises(CheckpointError, match="started at"):
        _setup(sigma=3.0).load_checkpoint(path)
