"""Everything a training run needs before its first step: data, model, features, device."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from swiftdp.cli.options import TrainConfig
from swiftdp.cli.privacy import augment_for
from swiftdp.cli.tasks import TrainTask, task_for
from swiftdp.data import Dataset, Split, load_dataset
from swiftdp.errors import InvalidArgumentError
from swiftdp.models import FeatureClassifier

DEFAULT_BATCH_SIZE = 1000
"""The default expected batch size (a quarter of the data for sets under 4,000 examples)."""


@dataclass
class Prepared:
    """The inputs of a run, ready to train on.

    Attributes:
        data: the dataset.
        task: what is trained and evaluated (classification or language modelling).
        eval_name: ``"test"``, or ``"validation"`` with ``--validation``.
        model: the full model (what ``model.pt`` holds).
        trainable: the part that is trained: ``model.classifier`` for a
            :class:`~swiftdp.models.FeatureClassifier` (its frozen features are
            computed once), else ``model``.
        train: training inputs (features when cached) and labels.
        evaluation: evaluation inputs and labels.
        batch_size: the resolved expected batch size.
        seed: the seed actually used for initialisation.
        device: the torch device.
    """

    data: Dataset
    task: TrainTask
    eval_name: str
    model: nn.Module
    trainable: nn.Module
    train: Split
    evaluation: Split
    batch_size: int
    seed: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; refuses ``cuda`` without a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda: no CUDA GPU is available to this PyTorch; use --device cpu."
        )
    return torch.device(name)


def available_cores() -> int:
    """The number of CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads (default: every core this process may use)."""
    torch.set_num_threads(max(1, available_cores() if threads is None else threads))


def default_batch_size(num_train: int) -> int:
    """``min(1000, N // 4)``, at least 1."""
    return max(1, min(DEFAULT_BATCH_SIZE, num_train // 4))


@torch.no_grad()
def featurize(features: nn.Module, x: Tensor, device: torch.device, chunk: int = 500) -> Tensor:
    """Apply a frozen feature extractor to every example, ``chunk`` at a time."""
    features = features.to(device).eval()
    outs = [features(x[i: i + chunk].to(device)).cpu() for i in range(0, len(x), chunk)]
    return torch.cat(outs) if outs else x


def prepare(cfg: TrainConfig) -> Prepared:
    """Load the data, build the model, cache frozen features.

    Raises:
        InvalidArgumentError: bad dataset folder or text file, model that does
            not fit the data, batch size larger than the training set, missing GPU.
    """
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_dir, data_file=cfg.data_file, seq_len=cfg.seq_len)
    task = task_for(data)
    if cfg.validation:
        train, evaluation = task.split_validation(data.train)
        eval_name = "validation"
    else:
        train, evaluation = data.train, data.test
        eval_name = "test"
    batch_size = cfg.batch_size or default_batch_size(len(train))
    if batch_size > len(train):
        raise InvalidArgumentError(
            f"--batch-size {batch_size} is larger than the {len(train)} training examples of "
            f"{cfg.dataset!r}; use at most {len(train)}."
        )
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(62)
    torch.manual_seed(seed)
    model = task.build_model(cfg, data)
    trainable: nn.Module = model
    # Frozen features are computed once and cached, unless the images are augmented
    # (--augmult / --augment): then each view goes through the features at every step.
    if isinstance(model, FeatureClassifier) and augment_for(cfg) is None:
        trainable = model.classifier
        train = Split(featurize(model.features, train.x, device), train.y)
        evaluation = Split(featurize(model.features, evaluation.x, device), evaluation.y)
    return Prepared(data, task, eval_name, model, trainable.to(device), train, evaluation,
                    batch_size, seed, device)
