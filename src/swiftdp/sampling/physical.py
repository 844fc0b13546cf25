"""Splitting a logical (Poisson) batch into physical chunks that fit in memory.

Privacy guarantee. Splitting changes speed and memory only, never privacy,
provided the training loop clips per example, accumulates the clipped sums
over all chunks of a logical batch, and adds noise and steps once, on the
chunk flagged ``is_last``. The functions here guarantee what that needs: the
chunks of a batch cover every example exactly once, in order, and an empty
logical batch still yields exactly one (empty) chunk, so the noise-only step
happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch

from swiftdp.checks import check_positive_int
from swiftdp.errors import InvalidArgumentError

__all__ = ["LogicalBatch", "PhysicalBatchSplitter", "batch_size_of", "split_physical"]

BatchT = TypeVar("BatchT")

_MAX_FIX = "Pass the largest number of examples that fits in memory at once."


def _leaves(batch: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(path, tensor)`` for every tensor in a nested batch."""
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(batch, tuple | list):
        for index, value in enumerate(batch):
            yield from _leaves(value, f"{path}[{index}]")
    elif batch is not None:
        raise InvalidArgumentError(
            f"`{path}` is a {type(batch).__name__}; a batch to split must hold only "
            "tensors (or None) nested in tuples, lists and dicts. Convert it to a "
            "tensor in your collate_fn, or drop it from the batch."
        )


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the shared leading dimension of its tensors.

    Args:
        batch: A tensor, or tensors (and None) nested in tuples, lists, dicts.

    Returns:
        The size of dimension 0, the same for every tensor.

    Raises:
        InvalidArgumentError: If the batch holds no tensor, a 0-dim tensor, a
            non-tensor leaf, or tensors whose leading dimensions differ.
    """
    sizes = {}
    for path, tensor in _leaves(batch, "batch"):
        if tensor.dim() == 0:
            raise InvalidArgumentError(
                f"`{path}` is a 0-dim tensor, so it has no batch dimension. Give every "
                "tensor of the batch a leading dimension of size batch_size."
            )
        sizes[path] = tensor.shape[0]
    if not sizes:
        raise InvalidArgumentError(
            f"`batch` ({type(batch).__name__}) holds no tensor. Pass a tensor or "
            "tensors nested in tuples, lists and dicts."
        )
    if len(set(sizes.values())) > 1:
        raise InvalidArgumentError(
            f"The tensors of `batch` have different leading dimensions {sizes}. Every "
            "tensor must have the batch as dimension 0."
        )
    return next(iter(sizes.values()))


def _slice(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor, keeping the nesting."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        items = {key: _slice(value, start, stop) for key, value in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple | list):
        parts = [_slice(value, start, stop) for value in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*parts)
        return type(batch)(parts)
    return batch  # None


def split_physical(batch: BatchT, max_physical_batch_size: int) -> Iterator[BatchT]:
    """Splits a batch along dimension 0 into chunks of at most the given size.

    Chunks are views (no copy), in order, and together hold every example
    exactly once. An empty batch yields exactly one empty chunk, so the
    logical step (noise only) still happens.

    Args:
        batch: A tensor, or tensors (and None) nested in tuples, lists, dicts;
            the structure is kept in every chunk.
        max_physical_batch_size: Largest chunk, >= 1.

    Returns:
        An iterator over the chunks; all but the last have exactly
        ``max_physical_batch_size`` examples.

    Raises:
        InvalidArgumentError: If ``max_physical_batch_size`` is not an int >= 1
            or the batch is malformed (see :func:`batch_size_of`). Raised at
            the call, before iteration.
    """
    check_positive_int(max_physical_batch_size, "max_physical_batch_size", _MAX_FIX)
    size = batch_size_of(batch)
    return _chunks(batch, size, max_physical_batch_size)


def _chunks(batch: BatchT, size: int, max_size: int) -> Iterator[BatchT]:
    if size == 0:
        yield batch
        return
    for start in range(0, size, max_size):
        yield _slice(batch, start, min(start + max_size, size))


class LogicalBatch(Generic[BatchT]):
    """One logical batch, iterated as ``(chunk, is_last)`` physical chunks.

    ``is_last`` is True exactly once, on the final chunk: that is where the
    training loop adds the noise and takes the optimiser step.

    Example:
        >>> chunks = LogicalBatch(torch.arange(5), 2)
        >>> [(c.tolist(), last) for c, last in chunks]
        [([0, 1], False), ([2, 3], False), ([4], True)]
    """

    def __init__(self, batch: BatchT, max_physical_batch_size: int) -> None:
        """Creates the logical batch.

        Args:
            batch: The logical batch (see :func:`split_physical`).
            max_physical_batch_size: Largest chunk, >= 1.

        Raises:
            InvalidArgumentError: As :func:`split_physical`.
        """
        self.max_physical_batch_size = check_positive_int(
            max_physical_batch_size, "max_physical_batch_size", _MAX_FIX
        )
        self.batch = batch
        self.size = batch_size_of(batch)

    @property
    def num_chunks(self) -> int:
        """Number of physical chunks, 1 for an empty batch."""
        return max(1, math.ceil(self.size / self.max_physical_batch_size))

    def __len__(self) -> int:
        """Returns :attr:`num_chunks`."""
        return self.num_chunks

    def __iter__(self) -> Iterator[tuple[BatchT, bool]]:
        """Yields ``(chunk, is_last)`` in order."""
        last = self.num_chunks - 1
        for index, chunk in enumerate(_chunks(self.batch, self.size, self.max_physical_batch_size)):
            yield chunk, index == last


class PhysicalBatchSplitter(Generic[BatchT]):
    """Iterates a loader of logical batches as physical chunks flagged ``is_last``.

    Example:
        >>> loader = [torch.arange(3), torch.arange(0)]
        >>> [(c.tolist(), last) for c, last in PhysicalBatchSplitter(loader, 2)]
        [([0, 1], False), ([2], True), ([], True)]
    """

    def __init__(self, loader: Iterable[BatchT], max_physical_batch_size: int) -> None:
        """Creates the splitter.

        Args:
            loader: Yields logical batches, e.g. a :class:`PoissonDataLoader`.
            max_physical_batch_size: Largest chunk, >= 1.

        Raises:
            InvalidArgumentError: If ``max_physical_batch_size`` is not an int >= 1.
        """
        self.loader = loader
        self.max_physical_batch_size = check_positive_int(
            max_physical_batch_size, "max_physical_batch_size", _MAX_FIX
        )

    def logical_batches(self) -> Iterator[LogicalBatch[BatchT]]:
        """Yields one :class:`LogicalBatch` per batch of the loader."""
        for batch in self.loader:
            yield LogicalBatch(batch, self.max_physical_batch_size)

    def __iter__(self) -> Iterator[tuple[BatchT, bool]]:
        """Yields ``(chunk, is_last)`` for every chunk of every logical batch."""
        for logical in self.logical_batches():
            yield from logical
