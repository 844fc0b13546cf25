"""Per-example losses: the unambiguous way to tell swiftdp what an example's loss is.

DP-SGD bounds each *example's* influence, so the loss must be a sum of
per-example terms. Library losses with ``reduction="mean"`` over a padded
batch (Hugging Face's causal-LM loss divides by the number of real tokens in
the whole batch) couple examples through that normaliser. These helpers
return one loss per example, reduced over that example's own tokens, for
:meth:`swiftdp.PrivateTraining.backward` / :meth:`swiftdp.GradClipper.backward`.

Example:
    >>> logits, labels = torch.randn(2, 4, 5), torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3]])
    >>> per_example_cross_entropy(logits, labels).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from swiftdp.errors import InvalidArgumentError

TokenReduction = Literal["mean", "sum"]


def per_example_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    token_reduction: TokenReduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of each example, reduced over its own (non-ignored) tokens.

    Args:
        logits: ``(B, C)`` or ``(B, T, C)``.
        labels: ``(B,)`` or ``(B, T)`` class indices; ``ignore_index`` marks padding.
        ignore_index: label value that contributes nothing.
        token_reduction: ``"mean"``: each example's loss is the mean over its
            own real tokens (0 for an example with none); ``"sum"``: their sum.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        ``(B,)`` losses, entry ``i`` a function of example ``i`` alone.

    Raises:
        InvalidArgumentError: shapes do not match or ``token_reduction`` is unknown.
    """
    if token_reduction not in ("mean", "sum"):
        raise InvalidArgumentError(
            f"Expected token_reduction in ('mean', 'sum'), got {token_reduction!r}."
        )
    if logits.dim() == 2 and labels.dim() == 1 and labels.shape[0] == logits.shape[0]:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise InvalidArgumentError(
            f"Expected logits (B, C) with labels (B,), or logits (B, T, C) with labels (B, T); "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index,
                          reduction="none", label_smoothing=label_smoothing)
    real = (labels != ignore_index).to(tok.dtype)
    total = (tok * real).sum(1)
    if token_reduction == "sum":
        return total
    return total / real.sum(1).clamp(min=1.0)


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    token_reduction: TokenReduction = "mean",
) -> Tensor:
    """Next-token loss of each example, as Hugging Face's causal LMs shift it, per example.

    Position ``t`` predicts token ``t + 1``: ``logits[:, :-1]`` against
    ``labels[:, 1:]``, then :func:`per_example_cross_entropy`.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, usually the input ids with padding set to ``ignore_index``.
        ignore_index: label value that contributes nothing.
        token_reduction: ``"mean"`` (each example's mean over its own real
            tokens) or ``"sum"``.

    Returns:
        ``(B,)`` losses.
    """
    return per_example_cross_entropy(
        logits[:, :-1], labels[:, 1:], ignore_index=ignore_index, token_reduction=token_reduction
    )


__all__ = ["causal_lm_loss", "per_example_cross_entropy"]
