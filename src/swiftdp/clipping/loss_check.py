"""The check that a loss decomposes over examples.

DP-SGD clips each example's gradient, so the loss must be a sum (or an
equal-weight mean) of per-example terms, term ``i`` depending on example
``i``'s outputs alone. Given the losses and the model's outputs, the check
differentiates through the loss only (never through the model):

* a vector of per-example losses ``(B,)``: the gradient of ``losses[j]``
  must vanish on every other example's outputs;
* a scalar: the second derivative must have no cross-example block — a
  Hessian-vector product with a direction on example ``j`` only must vanish
  on the others (it catches contrastive and pairwise losses; it cannot see a
  normaliser computed from the labels, such as a token count over the whole
  batch: pass per-example losses for those).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from swiftdp.errors import ExampleMixingError, InvalidArgumentError

_MIDDLE = random.SystemRandom()

_TOL = 1e-6


class OutputRef:
    """A model output as the check needs it: its gradient edge, shape, dtype and device.

    Holds no tensor, so recording the outputs of a forward keeps none of
    them alive (``torch.autograd.grad`` takes the edge as an input).
    """

    __slots__ = ("device", "dtype", "edge", "shape")

    def __init__(self, t: Tensor) -> None:
        self.edge: GradientEdge = get_gradient_edge(t)
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def dim(self) -> int:
        return len(self.shape)


def _inputs(outs: Sequence[Tensor | OutputRef]) -> list[GradientEdge]:
    return [o.edge if isinstance(o, OutputRef) else get_gradient_edge(o) for o in outs]


def check_loss(losses: Tensor, outputs: Sequence[Tensor | OutputRef], batch_size: int,
               batch_dim: int) -> bool:
    """Refuse a loss whose per-example terms depend on other examples.

    Args:
        losses: ``(B,)`` per-example losses, or a scalar loss.
        outputs: the model's outputs (requiring grad) of the forward, as tensors
            or :class:`OutputRef`.
        batch_size: ``B``.
        batch_dim: the batch dimension of sequence outputs (0 or 1).

    Returns:
        ``True`` when the check was conclusive; ``False`` when a non-finite
        value on the probed rows' derivatives (a NaN output spreads through
        the double backward) hid what it looks for: the caller checks the
        next batch of the signature again.

    Raises:
        InvalidArgumentError: ``losses`` has another shape.
        ExampleMixingError: a term depends on another example's outputs.
    """
    if not isinstance(losses, Tensor) or not (
        losses.dim() == 0 or (losses.dim() == 1 and losses.shape[0] == batch_size)
    ):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise InvalidArgumentError(
            f"Expected `losses` of shape ({batch_size},) — one loss per example of the last "
            f"forward — or a scalar, got {shape}. Compute the loss with reduction='none' and "
            "reduce each example over its own tokens (swiftdp.losses.per_example_cross_entropy)."
        )
    outs = [o for o in outputs if _bdim(o, batch_dim, batch_size) is not None]
    if batch_size < 2 or not outs or not losses.requires_grad:
        return True
    inputs = _inputs(outs)
    # The first and last rows, and a middle one drawn from OS entropy at each check:
    # a term that couples only rows inside the batch is seen too (a fixed middle row
    # could be dodged; the review measured 1.97 C for a term over rows 1..B-2).
    middle = _MIDDLE.randrange(1, batch_size - 1) if batch_size > 2 else 0
    probes = sorted({0, middle, batch_size - 1})
    conclusive = True
    if losses.dim() == 1:
        for j in probes:
            grads = torch.autograd.grad(losses[j], inputs, retain_graph=True, allow_unused=True)
            conclusive &= _require_only_row(grads, outs, j, batch_size, batch_dim, "its loss")
        return conclusive
    grads = torch.autograd.grad(losses, inputs, retain_graph=True, create_graph=True,
                                allow_unused=True)
    pairs = [(g, o) for g, o in zip(grads, outs, strict=True) if g is not None and g.requires_grad]
    if not pairs:
        return True  # linear in the outputs: no cross-example terms
    for j in probes:
        # A direction on row j only: the product is formed on that row (a full-size
        # direction and product would hold two more output-sized tensors).
        total = sum(((_row(g, o, j, batch_size, batch_dim) * _row_direction(o, j, batch_size,
                                                                          batch_dim)).sum()
                     for g, o in pairs),
                    torch.zeros((), dtype=pairs[0][0].dtype, device=pairs[0][0].device))
        hv = torch.autograd.grad(total, inputs, retain_graph=True, allow_unused=True)
        conclusive &= _require_only_row(hv, outs, j, batch_size, batch_dim,
                                        "the loss's gradient")
        del hv, total  # (not alive through the next probe's double backward)
    return conclusive


def _bdim(t: Tensor | OutputRef, bd: int, batch: int) -> int | None:
    d = bd if t.dim() > max(bd, 1) else 0
    return d if t.dim() > 0 and t.shape[d] == batch else None


def _row(g: Tensor, o: Tensor | OutputRef, j: int, batch: int, bd: int) -> Tensor:
    d = _bdim(o, bd, batch)
    assert d is not None
    return g.select(d, j)


def _row_direction(o: Tensor | OutputRef, j: int, batch: int, bd: int) -> Tensor:
    """A random direction on row ``j`` of ``o`` (the row's shape; zero on the other rows)."""
    d = _bdim(o, bd, batch)
    assert d is not None
    shape = o.shape[:d] + o.shape[d + 1:]
    gen = torch.Generator(device="cpu").manual_seed(j)
    return torch.randn(shape, generator=gen, dtype=o.dtype).to(o.device)


def _require_only_row(grads: tuple[Tensor | None, ...], outs: Sequence[Tensor | OutputRef],
                      j: int, batch: int, bd: int, what: str) -> bool:
    """Refuse a derivative of row ``j``'s terms reaching other rows; ``False``: not conclusive."""
    conclusive = True
    for g, o in zip(grads, outs, strict=True):
        if g is None:
            continue
        d = _bdim(o, bd, batch)
        assert d is not None
        # Largest entry on the other rows against the largest anywhere, without a copy
        # of the gradient (an infinity norm is a reduction; abs() and cat would be two).
        others = [g.narrow(d, 0, j), g.narrow(d, j + 1, batch - j - 1)]
        parts = [_amax(x) for x in others] + [_amax(g.select(d, j))]
        if not all(math.isfinite(v) for v in parts):
            # NaN or inf somewhere: judge on the finite entries; evidence of mixing there
            # still refuses, no evidence is not a pass (the signature is checked again).
            parts = [_amax(x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)) for x in
                     (*others, g.select(d, j))]
            conclusive = False
        off = max(parts[:2])
        scale = max(parts)
        if off > _TOL * max(scale, 1e-30):
            raise ExampleMixingError(
                f"The loss is not a sum of per-example terms: {what} for example {j} depends "
                f"on other examples' outputs (a model output of shape {tuple(o.shape)}). "
                "Contrastive, pairwise or batch-normalised losses couple examples, so one "
                "example's influence is not bounded by the clipping threshold. Compute each "
                "example's loss from its own outputs and labels only, e.g. "
                "swiftdp.losses.per_example_cross_entropy(logits, labels), and pass that vector."
            )
    return conclusive


def _amax(x: Tensor) -> float:
    """``max |x|`` as a number (one reduction, no copy of ``x``); 0 for an empty ``x``."""
    return float(torch.linalg.vector_norm(x, float("inf"))) if x.numel() else 0.0
