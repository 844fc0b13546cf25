"""The data types shared by the dataset loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from swiftdp.errors import InvalidArgumentError

Task = Literal["classification", "language-modelling"]
"""What a dataset's examples are for: class labels, or next-token prediction."""


class DataError(InvalidArgumentError):
    """A dataset cannot be loaded (unknown name, missing or unreadable folder)."""


@dataclass(frozen=True)
class Split:
    """One part of a dataset held in memory.

    Attributes:
        x: inputs, ``(N, C, H, W)`` float32 in [0, 1] for images, int64 token
            ids ``(N, T)`` for text.
        y: int64 class labels ``(N,)``; for language modelling the token ids
            ``(N, T)`` again (the model shifts them).
    """

    x: Tensor = field(repr=False)
    y: Tensor = field(repr=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def dataset(self) -> TensorDataset:
        """The split as a ``TensorDataset`` of ``(x, y)`` pairs."""
        return TensorDataset(self.x, self.y)

    def subset(self, index: Tensor) -> Split:
        """The examples at ``index``."""
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class Dataset:
    """A dataset with a fixed train/test split.

    Attributes:
        name: the registry name (``"mnist5k"``, ...).
        train: the training split (the only part DP training reads).
        test: the held-out test split.
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        num_classes: number of classes; for language modelling the vocabulary size.
        task: ``"classification"``, or ``"language-modelling"`` (``y`` is ``x``).
    """

    name: str
    train: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    task: Task = "classification"

    @staticmethod
    def from_splits(name: str, train: Split, test: Split) -> Dataset:
        """Build a :class:`Dataset`, reading the shape and class count off the data."""
        classes = int(torch.cat([train.y, test.y]).max().item()) + 1
        return Dataset(name, train, test, tuple(train.x.shape[1:]), classes)
