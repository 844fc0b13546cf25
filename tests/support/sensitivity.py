"""Neighbour sensitivity of a clipped sum, measured by removing one example at a time.

DP-SGD's guarantee rests on one number: for neighbouring batches ``D`` and
``D∖j`` (example ``j`` removed), the clipped sums differ by at most ``C``.
:func:`neighbour_sensitivity` measures ``max_j ‖S(D) − S(D∖j)‖`` for any
``S``, independently of how ``S`` was computed, so a test can hold an engine
to that bound directly.

References:
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ClippedSum = Callable[[Any], list[Tensor]]


def without_example(batch: Any, j: int, batch_size: int, batch_dim: int = 0) -> Any:
    """A (nested) batch with example ``j`` removed.

    Args:
        batch: a tensor, or lists, tuples and dicts of them, to any depth;
            every tensor leaf carries the batch along ``batch_dim`` (1-D
            tensors along dimension 0). Other leaves are kept as they are.
        j: the example to remove, ``0 <= j < batch_size``.
        batch_size: the batch size ``B``.
        batch_dim: the batch dimension of tensors with two or more dimensions.

    Returns:
        The same structure, each tensor leaf with ``B - 1`` examples.

    Raises:
        ValueError: a tensor leaf does not have ``batch_size`` examples.
    """
    if isinstance(batch, Tensor):
        dim = batch_dim if batch.dim() >= 2 else 0
        if batch.dim() == 0 or batch.shape[dim] != batch_size:
            raise ValueError(
                f"Expected every tensor of the batch to have {batch_size} examples along "
                f"dimension {dim}, got shape {tuple(batch.shape)}. Pass the batch size and "
                "batch_dim the batch was built with."
            )
        keep = torch.tensor([i for i in range(batch_size) if i != j], device=batch.device)
        return batch.index_select(dim, keep)
    if isinstance(batch, (list, tuple)):
        return type(batch)(without_example(b, j, batch_size, batch_dim) for b in batch)
    if isinstance(batch, dict):
        return {k: without_example(v, j, batch_size, batch_dim) for k, v in batch.items()}
    return batch


def neighbour_sensitivity(
    run_clipped_sum: ClippedSum, batch: Any, batch_size: int, batch_dim: int = 0
) -> float:
    """``max_j ‖S(D) − S(D∖j)‖``, the norm over all parameters flattened together.

    ``S(∅)`` is zero by definition (an empty batch is never run), so for a
    batch of one the result is ``‖S(D)‖``. A DP-SGD clipped sum with
    threshold ``C`` must give at most ``C`` (up to rounding).

    Args:
        run_clipped_sum: ``S``; takes a batch, returns the clipped sum as one
            tensor per parameter, always in the same order. It is called
            ``batch_size + 1`` times (fewer for a batch of one).
        batch: the batch ``D``, as :func:`without_example` takes it.
        batch_size: ``|D|``.
        batch_dim: the batch dimension of tensors with two or more dimensions.

    Returns:
        The largest change of the clipped sum when one example is removed
        (``0.0`` for an empty batch).
    """
    if batch_size == 0:
        return 0.0
    full = [s.detach().double() for s in run_clipped_sum(batch)]
    worst = 0.0
    for j in range(batch_size):
        if batch_size == 1:
            smaller = [torch.zeros_like(s) for s in full]
        else:
            smaller = [s.detach().double() for s in
                       run_clipped_sum(without_example(batch, j, batch_size, batch_dim))]
        if len(smaller) != len(full):
            raise ValueError(
                f"Expected run_clipped_sum to return {len(full)} tensors on every batch, got "
                f"{len(smaller)} without example {j}."
            )
        sq = sum(((a - b) ** 2).sum() for a, b in zip(full, smaller, strict=True))
        worst = max(worst, float(torch.as_tensor(sq).sqrt()))
    return worst
