"""The shared layer harness: every layer × mode × reduction against the oracle.

A layer test builds a small model around the layer (in float64), draws inputs,
and calls :func:`check_against_oracle`, which runs the swiftdp engine in the
requested mode and compares the clipped sums and norms with the
one-example-at-a-time reference (relative error <= 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

import swiftdp
from support.oracle import LossFn, max_rel_error, reference_clipped_sum

MODES = ("bk", "ghost", "per_sample", "nanobatch")
REDUCTIONS = ("mean", "sum")
TOL = 1e-6


def per_example_loss(output: Any, target: Tensor) -> Tensor:
    """A separable loss: squared error summed over all non-batch dims, per example."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    sq = (out - target) ** 2
    return sq.flatten(1).sum(1) if sq.dim() > 1 else sq


def batched_loss(reduction: str, per_example: Callable[[Any, Any], Tensor] = per_example_loss) -> LossFn:
    def f(output: Any, target: Any) -> Tensor:
        v = per_example(output, target)
        return v.mean() if reduction == "mean" else v.sum()

    return f


def check_against_oracle(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    *,
    mode: str,
    reduction: str = "mean",
    max_grad_norm: float = 0.7,
    clipping: str = "flat",
    per_example: Callable[[Any, Any], Tensor] = per_example_loss,
    batch_first: bool = True,
    call: Callable[[nn.Module, Any], Any] | None = None,
    tol: float = TOL,
) -> None:
    """Assert that swiftdp's clipped sum equals the one-at-a-time reference."""
    bd = 0 if batch_first else 1
    call = call or (lambda m, x: m(x))
    want, want_norms = reference_clipped_sum(
        model, lambda o, t: per_example(o, t).sum(), inputs, targets, max_grad_norm,
        clipping, batch_dim=bd, call=call,
    )
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(
        model, max_grad_norm, clipping=clipping, mode=mode, loss_reduction=reduction,
        batch_first=batch_first,
    )
    try:
        loss = batched_loss(reduction, per_example)(call(model, inputs), targets)
        loss.backward()
    finally:
        clipper.remove()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    err = max_rel_error(got, want)
    assert err <= tol, f"mode={mode} reduction={reduction}: clipped sum rel. error {err:.3e}"
    if want_norms.numel() and clipper.last_norms is not None:
        nerr = ((clipper.last_norms.double() - want_norms).abs().max() / want_norms.max().clamp(min=1e-12)).item()
        assert nerr <= tol, f"mode={mode}: per-example norm rel. error {nerr:.3e}"
    for p in model.parameters():
        p.grad = None
