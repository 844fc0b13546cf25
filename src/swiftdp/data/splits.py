"""Fixed, deterministic, class-stratified splits of a labelled dataset."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def stratified_split(
    labels: NDArray[np.integer], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split indices into two parts, class by class, with a fixed permutation.

    For every class ``c`` (in increasing order) the indices of its examples are
    permuted with ``numpy.random.default_rng(seed + c)``; the first
    ``round(fraction * n_c)`` go to the first part, the rest to the second.
    The result depends on ``labels``, ``fraction`` and ``seed`` only, so it is
    the same on every machine and every run.

    Args:
        labels: Integer class labels, shape ``(N,)``.
        fraction: Share of every class that goes to the first part, in (0, 1).
        seed: Seed of the fixed permutation.

    Returns:
        ``(first, second)``: sorted int64 index arrays that partition ``range(N)``.

    Example:
        >>> a, b = stratified_split(np.array([0, 0, 1, 1]), 0.5, seed=0)
        >>> len(a), len(b)
        (2, 2)
    """
    first: list[NDArray[np.int64]] = []
    second: list[NDArray[np.int64]] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c).astype(np.int64)
        idx = np.random.default_rng(seed + int(c)).permutation(idx)
        k = round(fraction * len(idx))
        first.append(idx[:k])
        second.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
