"""The noise generator and checkpoints: seeded runs resume its stream, secure runs never save it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.api import checkpoint as ckpt
from swiftdp.errors import CheckpointError


def _run(secure: bool):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return swiftdp.make_private(model, opt, DataLoader(ds, batch_size=12), noise_multiplier=1.0,
                                max_grad_norm=1.0, seed=7, delta=1e-3, secure=secure)


def _steps(dp, n):
    batches = iter(dp.data_loader)
    for _ in range(n):
        x, y = next(batches)
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()


def _params(dp):
    return torch.cat([p.detach().reshape(-1) for p in dp.model.parameters()])


def _generator_chunks(state: torch.Tensor, width: int = 32) -> list[bytes]:
    """The generator state in ``width``-byte pieces, leaving out uniform runs (zero padding)."""
    raw = state.numpy().tobytes()
    pieces = [raw[i:i + width] for i in range(0, len(raw) - width + 1, width)]
    return [p for p in pieces if len(set(p)) > 4]


def _holds_key(obj, key) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(_holds_key(v, key) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_key(v, key) for v in obj)
    return False


def test_seeded_checkpoint_holds_the_noise_generator_state(tmp_path):
    dp = _run(secure=False)
    _steps(dp, 2)
    state = dp.optimizer.generator.get_state()
    path = tmp_path / "ck.pt"
    dp.save_checkpoint(path)
    assert state.numpy().tobytes() in path.read_bytes()  # the control for the secure test
    assert torch.equal(ckpt.read(path)["optimizer"]["noise_generator"], state)


def test_secure_checkpoint_bytes_hold_no_noise_generator_state(tmp_path):
    dp = _run(secure=True)
    _steps(dp, 2)
    chunks = _generator_chunks(dp.optimizer.generator.get_state())
    assert len(chunks) > 100
    path = tmp_path / "ck.pt"
    dp.save_checkpoint(path)
    data = path.read_bytes()
    assert [c for c in chunks if c in data] == []
    payload = ckpt.read(path)
    assert payload["secure"] is True
    assert not _holds_key(payload, "noise_generator")


def test_resuming_twice_from_one_secure_checkpoint_draws_different_noise(tmp_path):
    original = _run(secure=True)
    _steps(original, 2)
    path = tmp_path / "ck.pt"
    original.save_checkpoint(path)
    first, second = _run(secure=True), _run(secure=True)
    first.load_checkpoint(path)
    second.load_checkpoint(path)
    assert torch.equal(_params(first), _params(original))
    assert torch.equal(_params(second), _params(original))
    # The same next batch and model in all three runs: only the noise can differ.
    for dp in (original, first, second):
        _steps(dp, 1)
    assert not torch.equal(_params(first), _params(second))
    assert not torch.equal(_params(first), _params(original))
    assert not torch.equal(_params(second), _params(original))
    draws = [torch.randn(64, generator=dp.optimizer.generator) for dp in (first, second)]
    assert not torch.equal(*draws)


def test_resuming_twice_from_one_seeded_checkpoint_draws_the_same_noise(tmp_path):
    original = _run(secure=False)
    _steps(original, 2)
    path = tmp_path / "ck.pt"
    original.save_checkpoint(path)
    first, second = _run(secure=False), _run(secure=False)
    first.load_checkpoint(path)
    second.load_checkpoint(path)
    for dp in (original, first, second):
        _steps(dp, 1)
    assert torch.equal(_params(first), _params(second))
    assert torch.equal(_params(first), _params(original))


@pytest.mark.parametrize(("saved", "resumed"), [(True, False), (False, True)])
def test_checkpoint_is_refused_by_a_run_with_the_other_secure_setting(tmp_path, saved, resumed):
    path = tmp_path / "ck.pt"
    dp = _run(secure=saved)
    _steps(dp, 1)
    dp.save_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"secure: checkpoint {saved} vs now {resumed}"):
        _run(secure=resumed).load_checkpoint(path)


def test_secure_run_never_saves_the_sampling_seed_or_state(tmp_path):
    dp = _run(secure=True)  # seed=7 is passed, but a secure run samples from OS entropy
    sampler = dp.data_loader.loader.poisson_sampler
    assert sampler.seed != 7
    _steps(dp, 2)
    chunks = _generator_chunks(sampler.generator.get_state())
    path = tmp_path / "ck.pt"
    dp.save_checkpoint(path)
    data = path.read_bytes()
    assert [c for c in chunks if c in data] == []
    saved = ckpt.read(path)["sampler"]
    assert saved["seed"] is None and saved["generator_state"] is None
    assert saved["steps_done"] == 2  # the position in the epoch is kept
    a, b = _run(secure=True), _run(secure=True)
    a.load_checkpoint(path)
    b.load_checkpoint(path)
    sa, sb = a.data_loader.loader.poisson_sampler, b.data_loader.loader.poisson_sampler
    assert sa.seed is None and sb.seed is None
    # each resume samples the rest of the run with fresh OS-entropy randomness
    assert not torch.equal(sa.generator.get_state(), sb.generator.get_state())
