"""Contracts of physical splitting: every example once, in order, empty steps kept."""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swiftdp.errors import InvalidArgumentError
from swiftdp.sampling import LogicalBatch, PhysicalBatchSplitter, batch_size_of, split_physical

Pair = namedtuple("Pair", ["x", "y"])


def _batch(n: int) -> tuple[torch.Tensor, dict[str, Any]]:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return x, {"y": torch.arange(n), "pair": Pair(x[:, :1] * 2, torch.arange(n) + 100), "m": None}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), max_size=st.integers(1, 25))
def test_chunks_cover_every_example_once_in_order_and_fit(n: int, max_size: int) -> None:
    batch = _batch(n)
    chunks = list(split_physical(batch, max_size))
    assert len(chunks) == max(1, math.ceil(n / max_size))
    sizes = [batch_size_of(chunk) for chunk in chunks]
    assert all(size <= max_size for size in sizes) and sum(sizes) == n
    assert all(size == max_size for size in sizes[:-1])
    assert torch.equal(torch.cat([chunk[1]["y"] for chunk in chunks]), batch[1]["y"])
    assert torch.equal(torch.cat([chunk[0] for chunk in chunks]), batch[0])
    pair_y = torch.cat([chunk[1]["pair"].y for chunk in chunks])
    assert torch.equal(pair_y, batch[1]["pair"].y)
    for chunk in chunks:
        assert isinstance(chunk, tuple) and isinstance(chunk[1]["pair"], Pair)
        assert chunk[1]["m"] is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), max_size=st.integers(1, 15))
def test_is_last_flags_exactly_the_final_chunk(n: int, max_size: int) -> None:
    logical = LogicalBatch(torch.arange(n), max_size)
    flags = [is_last for _, is_last in logical]
    assert flags == [False] * (len(logical) - 1) + [True]
    assert logical.size == n
    assert torch.equal(torch.cat([chunk for chunk, _ in logical]), torch.arange(n))


def test_empty_batch_yields_exactly_one_empty_chunk() -> None:
    empty = (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    chunks = list(split_physical(empty, 4))
    assert len(chunks) == 1 and chunks[0][0].shape == (0, 3)
    assert [(batch_size_of(c), last) for c, last in LogicalBatch(empty, 4)] == [(0, True)]


def test_splitter_flattens_a_loader_of_logical_batches() -> None:
    loader = [torch.arange(5), torch.arange(0), torch.arange(2)]
    splitter = PhysicalBatchSplitter(loader, 2)
    out = [(chunk.tolist(), last) for chunk, last in splitter]
    assert out == [
        ([0, 1], False), ([2, 3], False), ([4], True), ([], True), ([0, 1], True),
    ]  # fmt: skip
    assert [len(logical) for logical in splitter.logical_batches()] == [3, 1, 1]


def test_chunks_are_views_without_copies() -> None:
    x = torch.arange(10)
    first = next(split_physical(x, 4))
    assert first.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_max_physical_batch_size_is_refused(bad: object) -> None:
    text = (
        f"Expected `max_physical_batch_size` to be an int >= 1, got max_physical_batch_size={bad!r}"
    )
    for make in (
        lambda: split_physical(torch.zeros(3), bad),  # type: ignore[arg-type]
        lambda: LogicalBatch(torch.zeros(3), bad),  # type: ignore[arg-type]
        lambda: PhysicalBatchSplitter([], bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidArgumentError) as info:
            make()
        assert text in str(info.value)
        assert "largest number of examples that fits in memory" in str(info.value)


@pytest.mark.parametrize(
    ("batch", "text"),
    [
        (
            (torch.zeros(3), torch.zeros(4)),
            "different leading dimensions {'batch[0]': 3, 'batch[1]': 4}",
        ),
        ({"x": torch.zeros(2), "s": "hi"}, "`batch['s']` is a str"),
        ((torch.zeros(2), torch.tensor(1.0)), "`batch[1]` is a 0-dim tensor"),
        ([None, {}], "`batch` (list) holds no tensor"),
    ],
)
def test_malformed_batches_are_refused_by_path(batch: Any, text: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        split_physical(batch, 2)
    assert text in str(info.value)
