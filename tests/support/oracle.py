"""Independent references for the clipping engine.

The reference computes every example's gradient by its own forward and
backward with plain autograd (no swiftdp code), clips it, and sums: the
definition of DP-SGD's clipped sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Any, Any], Tensor]


def example(batch: Any, i: int, batch_dim: int = 0) -> Any:
    """Example ``i`` of a (nested) batch, batch dimension kept with size 1."""
    if isinstance(batch, Tensor):
        return batch.narrow(batch_dim, i, 1)
    if isinstance(batch, (list, tuple)):
        return type(batch)(example(b, i, batch_dim) for b in batch)
    if isinstance(batch, dict):
        return {k: example(v, i, batch_dim) for k, v in batch.items()}
    return batch


def reference_clipped_sum(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    max_grad_norm: float,
    clipping: str = "flat",
    batch_size: int | None = None,
    batch_dim: int = 0,
    call: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Clipped sum of per-example gradients, one example at a time.

    ``loss_fn(output_i, target_i)`` must be example ``i``'s own loss (its
    reduction over a batch of one is the per-example loss).

    Returns:
        (clipped sums in ``model.parameters()`` order of trainable params,
        per-example norms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    norms = []
    n = batch_size if batch_size is not None else _batch(inputs, batch_dim)
    call = call or (lambda m, x: m(x))
    for i in range(n):
        out = call(model, example(inputs, i, batch_dim))
        loss = loss_fn(out, example(targets, i, batch_dim))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        norm = torch.sqrt(sum(((g.double() ** 2).sum() for g in grads), torch.zeros((), dtype=torch.float64)))
        if clipping == "flat":
            c = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        else:
            c = max_grad_norm / (norm.item() + 0.01)
        norms.append(norm)
        for s, g in zip(sums, grads, strict=True):
            s.add_(g, alpha=c)
    return sums, torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)


def _batch(x: Any, bd: int) -> int:
    if isinstance(x, Tensor):
        return x.shape[bd]
    if isinstance(x, (list, tuple)):
        return _batch(x[0], bd)
    if isinstance(x, dict):
        return _batch(next(iter(x.values())), bd)
    raise TypeError(type(x))


def max_rel_error(got: list[Tensor | None], want: list[Tensor]) -> float:
    """Largest relative error over parameters (relative to each reference's max abs)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(w) if g is None else g
        scale = max(w.abs().max().item(), 1e-12) if w.numel() else 1.0
        err = (g - w).abs().max().item() / scale if w.numel() else 0.0
        if err != err or not (g.isfinite().all() and w.isfinite().all()):
            return float("inf")  # a NaN must never compare as "close"
        worst = max(worst, err)
    return worst
