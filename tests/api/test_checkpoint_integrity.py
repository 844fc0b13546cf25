"""A checkpoint's checksum: any damaged, truncated or edited byte is refused before unpickling."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.api import checkpoint as ckpt
from swiftdp.errors import CheckpointError

H = ckpt.HEADER_SIZE


def _run():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return swiftdp.make_private(model, opt, DataLoader(ds, batch_size=10), noise_multiplier=1.0,
                                max_grad_norm=1.0, seed=3, delta=1e-3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after 3 steps; returns ``(path, bytes, run)``."""
    dp = _run()
    batches = iter(dp.data_loader)
    for _ in range(3):
        x, y = next(batches)
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
    path = tmp_path_factory.mktemp("ck") / "ck.pt"
    dp.save_checkpoint(path, extra={"epoch": 0})
    return path, path.read_bytes(), dp


def _flip(data: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(data)
    out[byte] ^= 1 << bit
    return bytes(out)


def _rewrite(path, payload: dict) -> None:
    """Write ``payload`` in the documented layout, with a correct checksum."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = {"format": "swiftdp-checkpoint", "version": ckpt.VERSION, "payload_bytes": len(body),
              "payload_sha256": hashlib.sha256(body).hexdigest()}
    text = json.dumps(header, separators=(",", ":")).encode().ljust(H - 1) + b"\n"
    path.write_bytes(text + body)


def test_the_unmodified_checkpoint_loads(saved):
    path, _, _ = saved
    assert _run().load_checkpoint(path) == {"epoch": 0}


def test_every_flipped_bit_of_the_header_is_refused(saved, tmp_path):
    _, data, _ = saved
    bad = tmp_path / "bad.pt"
    for byte in range(H):
        for bit in range(8):
            bad.write_bytes(_flip(data, byte, bit))
            with pytest.raises(CheckpointError):
                ckpt.read(bad)


def test_a_flipped_bit_in_the_weights_is_refused_before_torch_load(saved, tmp_path, monkeypatch):
    _, data, dp = saved
    weight = dp.model[0].weight.detach().numpy().tobytes()
    at = data.index(weight)  # tensors are stored raw in the payload
    flipped = _flip(data, at + 5, 3)
    # Without the checksum the damage would pass: the payload still loads, with other weights.
    tampered = torch.load(io.BytesIO(flipped[H:]), weights_only=True)
    assert not torch.equal(tampered["model"]["0.weight"], dp.model[0].weight.detach())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(flipped)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointError, match="SHA-256 checksum") as info:
        _run().load_checkpoint(bad)
    assert calls == []
    message = str(info.value)
    assert str(bad) in message and "use an earlier checkpoint" in message


def test_flipped_bits_across_the_payload_are_refused(saved, tmp_path):
    _, data, _ = saved
    rng = random.Random(0)
    positions = [*range(H, len(data), max(1, (len(data) - H) // 300)), len(data) - 1]
    bad = tmp_path / "bad.pt"
    for byte in positions:
        bad.write_bytes(_flip(data, byte, rng.randrange(8)))
        with pytest.raises(CheckpointError, match="checksum"):
            ckpt.read(bad)


@pytest.mark.parametrize("keep", [0, 10, H - 1, H, H + 100, -1])
def test_truncated_checkpoint_is_refused(saved, tmp_path, keep):
    _, data, _ = saved
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="corrupt"):
        _run().load_checkpoint(bad)
    if keep >= H or keep < 0:
        with pytest.raises(CheckpointError, match="truncated"):
            ckpt.read(bad)


def test_bytes_appended_to_a_checkpoint_are_refused(saved, tmp_path):
    _, data, _ = saved
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data + b"\0")
    with pytest.raises(CheckpointError, match="longer than written"):
        ckpt.read(bad)


@pytest.mark.parametrize("edit", ["delete", "modify"])
def test_edited_accountant_history_is_refused(saved, tmp_path, edit):
    path, data, _ = saved
    payload = ckpt.read(path)
    if edit == "delete":
        payload["accountant"]["history"] = []
    else:
        payload["accountant"]["history"][0]["noise_multiplier"] = 50.0
    buf = io.BytesIO()
    torch.save(payload, buf)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:H] + buf.getvalue())  # the original header and checksum
    with pytest.raises(CheckpointError, match="corrupt"):
        _run().load_checkpoint(bad)


def test_deleted_accountant_history_with_a_recomputed_checksum_is_refused(saved, tmp_path):
    path, _, _ = saved
    payload = ckpt.read(path)
    payload["accountant"]["history"] = []
    bad = tmp_path / "bad.pt"
    _rewrite(bad, payload)
    with pytest.raises(CheckpointError, match="history records 0 steps but the optimizer took 3"):
        _run().load_checkpoint(bad)


def test_rewritten_payload_in_the_documented_layout_loads(saved, tmp_path):
    path, _, _ = saved
    again = tmp_path / "again.pt"
    _rewrite(again, ckpt.read(path))
    assert _run().load_checkpoint(again) == {"epoch": 0}
