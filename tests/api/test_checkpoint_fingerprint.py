"""A checkpoint is bound to its training data by a fingerprint of every example, not its size."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import swiftdp
from swiftdp.api import checkpoint as ckpt
from swiftdp.errors import CheckpointError


def _data(change: float = 0.0) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    x[17, 2] += change
    return TensorDataset(x, y)


def _run(dataset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return swiftdp.make_private(model, opt, DataLoader(dataset, batch_size=10),
                                noise_multiplier=1.0, max_grad_norm=1.0, seed=3, delta=1e-3)


def _step(dp):
    x, y = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    F.cross_entropy(dp.model(x), y).backward()
    dp.optimizer.step()


class Counting(Dataset):
    """Wraps a dataset and counts ``__getitem__`` calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        return self.inner[i]


class Lazy(Dataset):
    """``n`` examples computed from their index (``changed`` adds 1 to one of them)."""

    def __init__(self, n, changed=None):
        self.n, self.changed, self.calls = n, changed, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        return torch.tensor([float(i) + (i == self.changed)]), i % 10


class Augmented(Dataset):
    """Examples with random augmentation from the global torch, numpy and random generators."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.rand(3) + i, np.random.rand(2), random.random()


def test_checkpoint_of_same_size_but_different_data_is_refused_naming_both_fingerprints(tmp_path):
    path = tmp_path / "ck.pt"
    dp = _run(_data())
    _step(dp)
    dp.save_checkpoint(path)
    saved, now = ckpt.dataset_fingerprint(_data()), ckpt.dataset_fingerprint(_data(change=1e-3))
    with pytest.raises(CheckpointError, match="dataset fingerprint") as info:
        _run(_data(change=1e-3)).load_checkpoint(path)
    message = str(info.value)
    assert saved[:19] in message and now[:19] in message
    assert "same examples, order and preprocessing" in message and "dataset size" not in message


def test_checkpoint_of_the_same_data_rebuilt_loads(tmp_path):
    path = tmp_path / "ck.pt"
    dp = _run(_data())
    _step(dp)
    dp.save_checkpoint(path)
    _run(_data()).load_checkpoint(path)  # a fresh, equal copy of the data


def test_fingerprint_changes_with_any_value_label_or_order_and_not_otherwise():
    x, y = _data().tensors
    base = ckpt.dataset_fingerprint(TensorDataset(x, y))
    assert ckpt.dataset_fingerprint(TensorDataset(x.clone(), y.clone())) == base
    assert ckpt.dataset_fingerprint(_data(change=1e-6)) != base
    y2 = y.clone()
    y2[5] = (y2[5] + 1) % 3
    assert ckpt.dataset_fingerprint(TensorDataset(x, y2)) != base
    order = torch.arange(40)
    order[[3, 4]] = order[[4, 3]]
    assert ckpt.dataset_fingerprint(TensorDataset(x[order], y[order])) != base
    assert ckpt.dataset_fingerprint(TensorDataset(x.double(), y)) != base  # dtype counts
    assert base.startswith("sha256:") and len(base) == 7 + 64


def test_fingerprint_covers_arrays_strings_numbers_and_dicts():
    def examples(word):
        return [{"image": np.arange(6, dtype=np.uint8).reshape(2, 3), "text": word, "w": 0.5},
                (np.int64(3), None, [1, 2])]

    base = ckpt.dataset_fingerprint(examples("cat"))
    assert ckpt.dataset_fingerprint(examples("cat")) == base
    assert ckpt.dataset_fingerprint(examples("cot")) != base


def test_fingerprint_is_computed_once_per_run(tmp_path):
    data = Counting(_data())
    dp = _run(data)
    _step(dp)
    before = data.calls
    dp.save_checkpoint(tmp_path / "a.pt")
    assert data.calls - before == len(data)  # every example, once
    before = data.calls
    dp.save_checkpoint(tmp_path / "b.pt")
    dp.save_checkpoint(tmp_path / "a.pt")
    assert data.calls == before


def test_fingerprint_of_randomly_augmented_data_is_repeatable_and_leaves_global_rngs_alone():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = ckpt.dataset_fingerprint(Augmented())
    assert ckpt.dataset_fingerprint(Augmented()) == first
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_large_dataset_is_fingerprinted_from_a_fixed_sample_of_examples():
    n = ckpt.FULL_FINGERPRINT_LIMIT * 4
    data = Lazy(n)
    base = ckpt.dataset_fingerprint(data)
    assert 0 < data.calls <= ckpt.FINGERPRINT_SAMPLE
    assert ckpt.dataset_fingerprint(Lazy(n)) == base
    assert ckpt.dataset_fingerprint(Lazy(n + 1)) != base  # the size always counts
    assert ckpt.dataset_fingerprint(Lazy(n, changed=_a_sampled_index(n))) != base


def test_dataset_at_the_full_hash_limit_is_hashed_example_by_example():
    data = Lazy(ckpt.FULL_FINGERPRINT_LIMIT)
    ckpt.dataset_fingerprint(data)
    assert data.calls == ckpt.FULL_FINGERPRINT_LIMIT


def _a_sampled_index(n: int) -> int:
    """An index the sample reads: one whose change is seen."""

    class Recording(Lazy):
        def __getitem__(self, i):
            self.indices.append(i)
            return super().__getitem__(i)

    rec = Recording(n)
    rec.indices = []
    ckpt.dataset_fingerprint(rec)
    return rec.indices[len(rec.indices) // 2]
