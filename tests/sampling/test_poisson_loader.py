"""Contracts of poisson_data_loader: Poisson batches, empty steps that collate."""

from __future__ import annotations

import pickle
import warnings
from collections import namedtuple
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.dataloader import default_collate

from swiftdp.errors import InvalidArgumentError
from swiftdp.sampling import (
    EmptyBatchCollate,
    PoissonBatchSampler,
    PoissonDataLoader,
    poisson_data_loader,
    zero_rows,
)

Pair = namedtuple("Pair", ["image", "label"])


def _tensor_dataset(n: int = 100) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 2), torch.arange(n))


class _DictDataset(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "x": torch.full((4,), float(index), dtype=torch.float16),
            "pair": Pair(torch.zeros(2, 2), index),
            "text": f"example {index}",
            "weight": 0.5,
        }


class _NoLenDataset(Dataset[int]):
    def __getitem__(self, index: int) -> int:
        return index


class _Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(10))


def _no_warnings(loader: DataLoader[Any], **kwargs: Any) -> PoissonDataLoader:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return poisson_data_loader(loader, **kwargs)


@pytest.mark.parametrize("shuffle", [False, True])
def test_defaults_come_from_batch_size_and_dataset_length(shuffle: bool) -> None:
    loader = _no_warnings(DataLoader(_tensor_dataset(100), batch_size=8, shuffle=shuffle), seed=0)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.sample_rate == 0.08
    assert loader.expected_batch_size == 8.0
    assert loader.steps_per_epoch == len(loader) == 12  # floor(100 / 8)
    assert isinstance(loader.poisson_sampler.seed, int)


def test_batches_hold_exactly_the_sampled_examples() -> None:
    dataset = _tensor_dataset(60)
    loader = _no_warnings(DataLoader(dataset, batch_size=6), seed=3)
    expected = list(PoissonBatchSampler(60, 0.1, 10, seed=3))
    for (x, y), indices in zip(loader, expected, strict=True):
        assert y.tolist() == indices
        assert torch.equal(x, dataset.tensors[0][indices])


def test_explicit_sample_rate_and_steps_override_defaults() -> None:
    loader = _no_warnings(
        DataLoader(_tensor_dataset(1000), batch_size=8), sample_rate=0.04, num_steps=7
    )
    assert loader.sample_rate == 0.04 and len(loader) == 7
    assert loader.expected_batch_size == 40.0
    assert len(_no_warnings(DataLoader(_tensor_dataset(1000)), sample_rate=0.04)) == 25


def test_empty_batches_collate_to_zero_rows_shaped_like_an_example() -> None:
    loader = _no_warnings(DataLoader(_tensor_dataset(10), batch_size=1), sample_rate=1e-4, seed=0)
    batches = list(loader)
    empty = [(x, y) for x, y in batches if len(y) == 0]
    assert len(empty) >= 9
    x, y = empty[0]
    assert x.shape == (0, 3, 2) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64


def test_empty_batch_keeps_nested_structure_and_dtypes() -> None:
    loader = _no_warnings(DataLoader(_DictDataset(), batch_size=2), sample_rate=1e-6, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"x", "pair", "text", "weight"}
    assert batch["x"].shape == (0, 4) and batch["x"].dtype == torch.float16
    assert isinstance(batch["pair"], Pair)
    assert batch["pair"].image.shape == (0, 2, 2)
    assert batch["pair"].label.shape == (0,) and batch["pair"].label.dtype == torch.int64
    assert batch["text"] == []
    assert batch["weight"].shape == (0,) and batch["weight"].dtype == torch.float64


def test_empty_batches_collate_in_worker_processes() -> None:
    base = DataLoader(_tensor_dataset(10), batch_size=1, num_workers=2)
    loader = _no_warnings(base, sample_rate=0.02, num_steps=6, seed=0)
    assert loader.num_workers == 2 and loader.prefetch_factor == 2
    shapes = [tuple(x.shape[1:]) for x, _ in loader]
    assert shapes == [(3, 2)] * 6


def test_resume_mid_epoch_through_workers_that_prefetch() -> None:
    def make() -> PoissonDataLoader:
        base = DataLoader(_tensor_dataset(50), batch_size=5, num_workers=2)
        return _no_warnings(base, seed=11)

    reference = [y.tolist() for y in (batch[1] for batch in make())]
    loader = make()
    iterator = iter(loader)
    seen = [next(iterator)[1].tolist() for _ in range(4)]
    state = loader.poisson_sampler.state_dict(steps_consumed=len(seen))
    del iterator
    resumed = make()
    resumed.poisson_sampler.load_state_dict(state)
    assert seen + [batch[1].tolist() for batch in resumed] == reference


def test_collate_wrapper_keeps_user_collate_and_pickles() -> None:
    def double(examples: list[Any]) -> Any:
        x, y = default_collate(examples)
        return x * 2, y

    dataset = _tensor_dataset(20)
    loader = _no_warnings(DataLoader(dataset, batch_size=20, collate_fn=double), seed=0)
    x, _ = next(iter(loader))
    assert torch.equal(x, dataset.tensors[0] * 2)  # sample rate 1
    assert isinstance(loader.collate_fn, EmptyBatchCollate)
    assert loader.collate_fn.collate_fn is double
    wrapper = EmptyBatchCollate.from_dataset(dataset, default_collate)
    x, y = pickle.loads(pickle.dumps(wrapper))([])
    assert x.shape == (0, 3, 2) and y.shape == (0,)


def test_rewrapping_a_poisson_loader_keeps_its_rate_without_warning() -> None:
    first = _no_warnings(DataLoader(_tensor_dataset(100), batch_size=10), seed=0)
    second = _no_warnings(first)
    assert second.sample_rate == 0.1
    assert second.collate_fn.collate_fn is default_collate  # type: ignore[union-attr]


def test_zero_rows_of_plain_values_outside_sequences_are_unchanged() -> None:
    assert zero_rows({"n": 3, "t": torch.tensor(1.0)}) == {"n": 3, "t": torch.tensor(1.0)}


def test_custom_sampler_is_replaced_with_a_warning() -> None:
    dataset = _tensor_dataset(100)
    weighted = WeightedRandomSampler([1.0] * 100, num_samples=100)
    with pytest.warns(UserWarning) as record:
        loader = poisson_data_loader(DataLoader(dataset, batch_size=10, sampler=weighted))
    message = str(record[0].message)
    assert "`train_loader` uses a custom sampler (WeightedRandomSampler)" in message
    assert "privacy accounting assumes Poisson sampling" in message
    assert "replaced by PoissonBatchSampler" in message
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.sample_rate == 0.1


class _FixedBatches:
    def __iter__(self) -> Iterator[list[int]]:
        return iter([[0, 1], [2, 3]])


def test_plain_batch_sampler_counts_as_default_batching() -> None:
    batches = BatchSampler(SequentialSampler(range(100)), batch_size=10, drop_last=False)
    loader = _no_warnings(DataLoader(_tensor_dataset(100), batch_sampler=batches))
    assert loader.sample_rate == 0.1


def test_custom_batch_sampler_needs_an_explicit_sample_rate() -> None:
    base = DataLoader(_tensor_dataset(100), batch_sampler=_FixedBatches())
    with pytest.warns(UserWarning, match=r"custom sampler \(_FixedBatches\)"):
        with pytest.raises(InvalidArgumentError) as info:
            poisson_data_loader(base)
    assert "`train_loader.batch_size` is None" in str(info.value)
    assert "Pass sample_rate=<expected batch size> / 100" in str(info.value)
    with pytest.warns(UserWarning, match="custom sampler"):
        assert poisson_data_loader(base, sample_rate=0.1).sample_rate == 0.1


def test_unbatched_loader_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="`train_loader` has batch_size=None") as info:
        poisson_data_loader(DataLoader(_tensor_dataset(10), batch_size=None))
    assert "batch_size=<expected batch size>" in str(info.value)


@pytest.mark.parametrize(
    ("dataset", "text"),
    [
        (_NoLenDataset(), "`train_loader.dataset` (_NoLenDataset) has no __len__"),
        (_Stream(), "`train_loader.dataset` is an IterableDataset (_Stream)"),
        (TensorDataset(torch.zeros(0, 2)), "`train_loader.dataset` is empty (len=0)"),
    ],
)
def test_datasets_that_cannot_be_sampled_by_index_are_refused(
    dataset: Dataset[Any], text: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        poisson_data_loader(DataLoader(dataset, batch_size=2))
    assert text in str(info.value)
    if "empty" not in text:
        assert "map-style torch.utils.data.Dataset" in str(info.value)


def test_error_names_the_callers_argument() -> None:
    with pytest.raises(InvalidArgumentError, match=r"`data\.dataset` is an IterableDataset"):
        poisson_data_loader(DataLoader(_Stream(), batch_size=2), name="data")


@pytest.mark.parametrize("rate", [0.0, 1.01, float("nan")])
def test_bad_sample_rate_is_refused(rate: float) -> None:
    with pytest.raises(InvalidArgumentError, match=r"Expected sample_rate (in \(0, 1\]|to be a number)"):
        poisson_data_loader(DataLoader(_tensor_dataset(10), batch_size=2), sample_rate=rate)


def test_batch_size_above_dataset_length_is_refused() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"batch_size`=20 is larger than len\(dataset\)=10"
    ):
        poisson_data_loader(DataLoader(_tensor_dataset(10), batch_size=20))


def test_non_loader_and_bad_num_steps_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="Expected `train_loader` to be a torch"):
        poisson_data_loader([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="got num_steps=0"):
        poisson_data_loader(DataLoader(_tensor_dataset(10), batch_size=2), num_steps=0)
