"""What ``swiftdp train`` optimises and reports, per kind of dataset.

A :class:`Task` holds everything that differs between image classification
and byte-level language modelling, so the training loop
(:mod:`swiftdp.cli.train`) has one path for both: how the model is built,
how a batch's loss is formed, which metric is evaluated and how it reads.

=======================  ==========================  ==========================
                         classification              language modelling
=======================  ==========================  ==========================
model                    the zoo (``build_model``)   ``gpt-tiny`` or ``hf:CONFIG``
batch loss               ``cross_entropy(model(x),   ``model(input_ids=x,
                         y)``                        labels=x).loss``
metric                   accuracy (higher better)    perplexity (lower better)
validation split         stratified 20%              the last 20% of the blocks
=======================  ==========================  ==========================

Privacy: under DP-SGD the loss is a sum over examples of one loss per example
(``loss_reduction="sum"``). For a Hugging Face LM, :class:`swiftdp.hf.ModelLoss`
(attached by :func:`swiftdp.make_private`) makes ``.loss`` the sum of each
block's mean over its own tokens; the model's own token mean over the batch,
which couples examples, is never used for a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swiftdp.cli.options import TrainConfig
from swiftdp.data import Dataset, Split, Task, validation_split
from swiftdp.data.text import BOS_ID
from swiftdp.models import build_model
from swiftdp.models.causal_lm import build_causal_lm


@dataclass(frozen=True)
class BatchLoss:
    """The loss of one batch and what the progress bar adds up.

    Attributes:
        loss: what is backpropagated (a sum over examples under DP, a mean without).
        total: the sum of the examples' losses (for the running mean).
        hits: the sum of the task's per-example training statistic (correct
            predictions; 0 for language modelling).
    """

    loss: Tensor
    total: float
    hits: float


class TrainTask(Protocol):
    """The task-specific part of a run (see the module docstring).

    Attributes:
        kind: the dataset task it serves.
        metric: the evaluated metric's name (``accuracy``, ``perplexity``).
        short: its short name in the progress bar.
        higher_is_better: whether a larger metric is a better model.
    """

    kind: Task
    metric: str
    short: str
    higher_is_better: bool

    def build_model(self, cfg: TrainConfig, data: Dataset) -> nn.Module:
        """The freshly initialised model for ``data`` (torch's RNG seeded by the caller)."""
        ...

    def split_validation(self, train: Split) -> tuple[Split, Split]:
        """``(fit, validation)`` carved out of the training split."""
        ...

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, summed: bool) -> BatchLoss:
        """The loss of a non-empty batch: summed over examples if ``summed``, else their mean."""
        ...

    def train_metric(self, total: float, hits: float, seen: int) -> float:
        """The training metric from the running sums of :class:`BatchLoss`."""
        ...

    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> float:
        """The metric of ``model`` on ``split``."""
        ...

    def show(self, value: float) -> str:
        """The metric as the report prints it."""
        ...


class Classification:
    """Image classification: cross-entropy on the class logits, accuracy."""

    kind: Task = "classification"
    metric = "accuracy"
    short = "acc"
    higher_is_better = True
    chunk = 1000

    def build_model(self, cfg: TrainConfig, data: Dataset) -> nn.Module:
        """A model of the zoo for the data's input shape and classes."""
        return build_model(cfg.model, data.input_shape, data.num_classes, cfg.model_size)

    def split_validation(self, train: Split) -> tuple[Split, Split]:
        """A fixed, class-stratified 20% (:func:`swiftdp.data.validation_split`)."""
        return validation_split(train, task=self.kind)

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, summed: bool) -> BatchLoss:
        """Cross-entropy of ``model(x)`` against the labels ``y``.

        With augmentation multiplicity (``x`` ``(B, K, C, H, W)``, ``y``
        ``(B, K)``, the model's output ``(B, K, classes)``) each example's
        loss is the mean over its ``K`` views, and its accuracy too.
        """
        out = model(x)
        if y.dim() == 2:  # views: (B, K)
            per_view = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
            per_example = per_view.view(y.shape).mean(1)
            loss = per_example.sum() if summed else per_example.mean()
            total = loss.item() if summed else loss.item() * len(y)
            return BatchLoss(loss, total, float((out.argmax(-1) == y).float().mean(1).sum()))
        loss = F.cross_entropy(out, y, reduction="sum" if summed else "mean")
        total = loss.item() if summed else loss.item() * len(y)
        return BatchLoss(loss, total, float((out.argmax(1) == y).sum()))

    def train_metric(self, total: float, hits: float, seen: int) -> float:
        """Training accuracy."""
        return hits / max(seen, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> float:
        """Accuracy: the share of examples whose largest logit is their class."""
        correct = 0
        for i in range(0, len(split), self.chunk):
            out = model(split.x[i: i + self.chunk].to(device))
            correct += int((out.argmax(1).cpu() == split.y[i: i + self.chunk]).sum())
        return correct / max(len(split), 1)

    def show(self, value: float) -> str:
        """``96.20%``."""
        return f"{100 * value:.2f}%"


class LanguageModelling:
    """Next-byte prediction with a causal LM: its own ``labels=`` loss, perplexity."""

    kind: Task = "language-modelling"
    metric = "perplexity"
    short = "ppl"
    higher_is_better = False
    logits_per_chunk = 1 << 24
    """How many logits one evaluation forward may hold (64 MB in float32)."""

    def build_model(self, cfg: TrainConfig, data: Dataset) -> nn.Module:
        """``gpt-tiny`` or ``hf:CONFIG`` over the byte vocabulary and the block length."""
        return build_causal_lm(cfg.model, data.num_classes, data.input_shape[0],
                               cfg.model_size, bos_token_id=BOS_ID)

    def split_validation(self, train: Split) -> tuple[Split, Split]:
        """The last 20% of the training blocks, in file order."""
        return validation_split(train, task=self.kind)

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, summed: bool) -> BatchLoss:
        """The model's ``labels=`` loss: each block's mean over its own predicted tokens.

        Under DP (``summed``) :class:`swiftdp.hf.ModelLoss` makes it the sum of
        the blocks' means; without DP it is the model's own token mean, which
        is the mean of the blocks' means since every block has the same length.
        """
        loss = model(input_ids=x, labels=y).loss
        total = loss.item() if summed else loss.item() * len(y)
        return BatchLoss(loss, total, 0.0)

    def train_metric(self, total: float, hits: float, seen: int) -> float:
        """Training perplexity, ``exp`` of the mean loss (all blocks have the same length)."""
        return _exp(total / max(seen, 1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> float:
        """Perplexity per byte: ``exp`` of the mean next-token cross-entropy over every
        predicted position of every block (each byte of the split, predicted from the
        bytes before it in its block)."""
        nll, count = 0.0, 0
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
        chunk = max(1, self.logits_per_chunk // (split.x.shape[1] * vocab))
        for i in range(0, len(split), chunk):
            ids = split.x[i: i + chunk].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         target.reshape(-1), reduction="sum"))
            count += target.numel()
        return _exp(nll / max(count, 1))

    def show(self, value: float) -> str:
        """``5.12 per byte (2.36 bits per byte)``."""
        return f"{value:.3f} per byte ({math.log2(value):.3f} bits per byte)"


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


TASKS: dict[str, TrainTask] = {"classification": Classification(),
                               "language-modelling": LanguageModelling()}
"""The :class:`TrainTask` of each :attr:`swiftdp.data.Dataset.task`."""


def task_for(data: Dataset) -> TrainTask:
    """The task that trains on ``data``."""
    return TASKS[data.task]
