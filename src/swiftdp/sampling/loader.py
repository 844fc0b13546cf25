"""Turning a user's ``DataLoader`` into a Poisson-sampled one.

Privacy guarantee. The loader returned by :func:`poisson_data_loader` draws
its batches only through :class:`~swiftdp.sampling.PoissonBatchSampler`, so
every step includes each example independently with probability
``sample_rate``, as the accountant assumes. Whatever sampler the user's loader
had is replaced (with a warning when it was not the default one). Empty
batches are collated to zero-row tensors so that a step with no examples is a
normal (noise-only) step instead of a crash.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from swiftdp.checks import check_positive_int, check_sample_rate
from swiftdp.errors import InvalidArgumentError
from swiftdp.sampling.poisson import PoissonBatchSampler, exact_fraction, steps_per_epoch

__all__ = ["EmptyBatchCollate", "PoissonDataLoader", "poisson_data_loader", "zero_rows"]

_PER_EXAMPLE_LEAVES = (str, bytes, int, float, complex, bool, type(None))


def zero_rows(batch: Any) -> Any:
    """Returns a batch of the same structure as ``batch`` with zero examples.

    Tensors and arrays keep dtype and trailing shape and get a leading
    dimension of 0; tuples, lists, named tuples and dicts are recursed into; a
    list or tuple of plain Python values (e.g. the strings of a text batch) is
    taken as one value per example and becomes empty. Other leaves (0-dim
    tensors, single Python values outside a sequence) are returned unchanged.

    Args:
        batch: A collated batch, e.g. ``collate_fn([dataset[0]])``.

    Returns:
        The empty batch.
    """
    if isinstance(batch, torch.Tensor | np.ndarray):
        return batch[:0] if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        items = {key: zero_rows(value) for key, value in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple | list):
        if all(isinstance(item, _PER_EXAMPLE_LEAVES) for item in batch):
            return type(batch)()
        items_list = [zero_rows(item) for item in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*items_list)
        return type(batch)(items_list)
    return batch


class EmptyBatchCollate:
    """Wraps a ``collate_fn`` so that an empty Poisson batch collates to zero rows.

    Non-empty batches go to the wrapped function unchanged. An empty list of
    examples (what ``DataLoader`` passes for an empty index list) returns
    :func:`zero_rows` of a template built from one real example, so the
    training step sees tensors of shape ``(0, ...)`` with the right dtypes.
    Picklable, so it works with worker processes.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], empty_batch: Any) -> None:
        """Creates the wrapper.

        Args:
            collate_fn: The user's collate function.
            empty_batch: What an empty batch collates to (see :meth:`from_dataset`).
        """
        self.collate_fn = collate_fn
        self.empty_batch = empty_batch

    @classmethod
    def from_dataset(
        cls, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any]
    ) -> EmptyBatchCollate:
        """Builds the wrapper, learning shapes and dtypes from ``dataset[0]``.

        The template is ``zero_rows(collate_fn([dataset[0]]))``: it assumes the
        collated batch is batch-first, as ``default_collate`` makes it.

        Args:
            dataset: A map-style dataset with at least one example.
            collate_fn: The user's collate function.

        Returns:
            The wrapper.
        """
        return cls(collate_fn, zero_rows(collate_fn([dataset[0]])))

    def __call__(self, examples: Any) -> Any:
        """Collates ``examples``; an empty sequence gives the zero-row template."""
        if isinstance(examples, list | tuple) and len(examples) == 0:
            return zero_rows(self.empty_batch)
        return self.collate_fn(examples)


class PoissonDataLoader(DataLoader[Any]):
    """A ``DataLoader`` whose batches come from a :class:`PoissonBatchSampler`.

    ``len(loader)`` is the number of steps per epoch. Attributes that the
    privacy machinery needs:

    Attributes:
        poisson_sampler: The sampler (its ``state_dict`` goes in checkpoints).
        sample_rate: q, the inclusion probability per example and step.
        expected_batch_size: q * N as a float; the divisor of the noisy
            gradient sum (never the realised batch size).
        steps_per_epoch: Batches per full epoch.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        poisson_sampler: PoissonBatchSampler,
        expected_batch_size: float,
        **kwargs: Any,
    ) -> None:
        """Creates the loader.

        Args:
            dataset: The map-style dataset.
            poisson_sampler: The batch sampler.
            expected_batch_size: q * N.
            **kwargs: Other ``DataLoader`` arguments (collate_fn, num_workers...).
        """
        super().__init__(dataset, batch_sampler=poisson_sampler, **kwargs)
        self.poisson_sampler = poisson_sampler
        self.sample_rate = poisson_sampler.sample_rate
        self.expected_batch_size = expected_batch_size
        self.steps_per_epoch = poisson_sampler.num_steps


def _dataset_length(dataset: object, name: str) -> int:
    """Returns ``len(dataset)`` or raises a helpful error."""
    fix = (
        "Poisson sampling draws each example by index, so use a map-style "
        "torch.utils.data.Dataset that defines __getitem__ and __len__ (e.g. "
        "TensorDataset, or materialise the stream into a list)."
    )
    if isinstance(dataset, IterableDataset):
        raise InvalidArgumentError(
            f"`{name}.dataset` is an IterableDataset ({type(dataset).__name__}), which "
            f"cannot be sampled by index. {fix}"
        )
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"`{name}.dataset` ({type(dataset).__name__}) has no __len__, so the sample "
            f"rate and the privacy accounting cannot be computed. {fix}"
        ) from None
    if length < 1:
        raise InvalidArgumentError(
            f"`{name}.dataset` is empty (len=0). Pass a dataset with at least one example."
        )
    return length


def _is_default_sampling(loader: DataLoader[Any], num_samples: int) -> bool:
    """Whether the loader uses plain batching over sequential or shuffled order."""
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, PoissonBatchSampler):
        return True
    if type(batch_sampler) is not BatchSampler:
        return False
    sampler = batch_sampler.sampler
    if type(sampler) is SequentialSampler:
        return True
    return (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == num_samples
    )


def poisson_data_loader(
    loader: DataLoader[Any],
    sample_rate: float | None = None,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    name: str = "train_loader",
    rank: int = 0,
    world_size: int = 1,
) -> PoissonDataLoader:
    """Builds a Poisson-sampled ``DataLoader`` over the same dataset as ``loader``.

    The new loader keeps ``loader``'s dataset, collate function (wrapped by
    :class:`EmptyBatchCollate`), workers, pinning, timeout, worker init,
    multiprocessing context, prefetching and ``generator`` (used by torch for
    worker seeds only). Its batches come from a :class:`PoissonBatchSampler`.

    Defaults: ``sample_rate = loader.batch_size / len(dataset)`` (exactly, as
    a fraction) and ``num_steps = floor(1 / sample_rate)`` computed exactly
    (see :func:`~swiftdp.sampling.steps_per_epoch`): 0.04 gives 25 steps,
    batch 256 of 60000 gives 234. An epoch thus draws ``num_steps * q * N <= N``
    examples in expectation. The accountant must count the steps actually taken.

    Args:
        loader: The user's loader; only its dataset and settings are reused.
        sample_rate: q in (0, 1]; default ``loader.batch_size / len(dataset)``.
        num_steps: Steps per epoch; default ``floor(1 / q)``.
        generator: CPU generator for the sampling; exclusive with ``seed``.
        seed: Seed of a new sampling generator; None (and no generator) draws a
            secret seed from the OS, recorded as ``loader.poisson_sampler.seed``.
        name: How ``loader`` is called in error messages (make_private passes
            its own argument name).

    Returns:
        A :class:`PoissonDataLoader` with ``sample_rate``, ``expected_batch_size``
        (q * N as a float) and ``steps_per_epoch`` attributes.

    Raises:
        InvalidArgumentError: If ``loader`` is not a DataLoader, its dataset is
            iterable-style, has no ``__len__`` or is empty, it does not batch
            (``batch_size=None`` without a batch_sampler), the sample rate
            cannot be inferred (``batch_size`` None and no ``sample_rate``),
            ``sample_rate`` is not in (0, 1], or ``num_steps`` is not >= 1.

    Warns:
        UserWarning: If ``loader`` has a custom sampler or batch sampler; it is
            replaced because the accounting assumes Poisson sampling.
    """
    if not isinstance(loader, DataLoader):
        raise InvalidArgumentError(
            f"Expected `{name}` to be a torch.utils.data.DataLoader, got "
            f"{type(loader).__name__}. Wrap your dataset: DataLoader(dataset, batch_size=...)."
        )
    dataset = loader.dataset
    num_samples = _dataset_length(dataset, name)
    if loader.batch_sampler is None:
        raise InvalidArgumentError(
            f"`{name}` has batch_size=None, so it yields single examples without "
            "batching and its collate_fn cannot stack a batch. Build it with "
            "batch_size=<expected batch size> (the sample rate defaults to "
            "batch_size / len(dataset))."
        )
    if not _is_default_sampling(loader, num_samples):
        custom: object = loader.batch_sampler
        if isinstance(custom, BatchSampler) and type(custom) is BatchSampler:
            custom = custom.sampler
        warnings.warn(
            f"`{name}` uses a custom sampler ({type(custom).__name__}). swiftdp's privacy "
            "accounting assumes Poisson sampling (every example included independently "
            "with probability sample_rate at every step), so the custom sampler is "
            "replaced by PoissonBatchSampler. To silence this warning, build the loader "
            "with batch_size=<expected batch size> and no sampler.",
            UserWarning,
            stacklevel=2,
        )
    batch_size = loader.batch_size
    if type(loader.batch_sampler) is BatchSampler:
        batch_size = loader.batch_sampler.batch_size
    rate: Fraction
    if sample_rate is not None:
        check_sample_rate(sample_rate, allow_zero=False)
        rate = exact_fraction(sample_rate)
    elif isinstance(loader.batch_sampler, PoissonBatchSampler):
        rate = exact_fraction(loader.batch_sampler.sample_rate)
    elif batch_size is None:
        raise InvalidArgumentError(
            f"`{name}.batch_size` is None (the loader was built with a custom "
            f"batch_sampler), "
            "so the sample rate cannot be inferred. Pass sample_rate=<expected batch "
            f"size> / {num_samples} (len(dataset)), or build the loader with "
            "batch_size=<expected batch size>."
        )
    else:
        rate = Fraction(batch_size, num_samples)
        if rate > 1:
            raise InvalidArgumentError(
                f"`{name}.batch_size`={batch_size} is larger than len(dataset)="
                f"{num_samples}, giving a sample rate above 1. Use a batch_size of at "
                f"most {num_samples}, or pass sample_rate explicitly."
            )
    if num_steps is None:
        num_steps = steps_per_epoch(rate)
    check_positive_int(
        num_steps, "num_steps", "Pass the number of steps per epoch, or None for floor(1/q)."
    )
    sampler = PoissonBatchSampler(num_samples, float(rate), num_steps, generator, seed=seed,
                                  rank=rank, world_size=world_size)
    collate_fn: Callable[[list[Any]], Any] = loader.collate_fn
    if isinstance(collate_fn, EmptyBatchCollate):
        collate_fn = collate_fn.collate_fn
    return PoissonDataLoader(
        dataset,
        sampler,
        expected_batch_size=float(rate * num_samples),
        collate_fn=EmptyBatchCollate.from_dataset(dataset, collate_fn),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )
