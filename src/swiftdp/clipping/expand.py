"""The expand rule: a parameter broadcast over the batch by an elementwise op.

A learned scale, a position embedding, ``cls_token.expand(B, ...)``: the
parameter is replaced by a leaf expanded along the batch dimension, whose
gradient is exactly the per-example gradient. Used only where every operand
that carries the batch has it at the output's batch dimension (tracked from
the model's inputs), or for an explicit ``Tensor.expand`` to the batch, whose
rows every later op must keep aligned with the examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swiftdp.clipping import batchdim
from swiftdp.clipping.args import flat, replace_in
from swiftdp.clipping.capture import Capture
from swiftdp.clipping.contract import Build, Policy
from swiftdp.clipping.contributions import Contribution, PerSampleGrads

if TYPE_CHECKING:
    from collections.abc import Sequence

    from swiftdp.clipping.tracer import Tracer


def expand_rule(
    tr: Tracer, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    found: list[Tensor], ref: Tensor,
) -> Tensor | None:
    bd = tr.batch_dim if ref.dim() >= 3 else 0
    B = tr.batch_size
    if ref.dim() <= bd or ref.shape[bd] != B:
        return None
    # The batch must line up with the other operands' tracked batch. An
    # explicit `p.expand(B, ...)` (a cls token) has no other operand: its
    # output's batch is marked virtual, and every later op must keep its
    # rows aligned with the examples (checked in _mark_outputs).
    explicit = func is Tensor.expand and not _any_batched(tr, args, kwargs)
    if not (explicit or _batch_at(tr, args, kwargs, bd, ref)):
        return None
    leaves: dict[int, tuple[Tensor, Tensor, torch.Size]] = {}
    regions: dict[int, tuple[slice, ...] | None] = {}
    for p in found:
        v = tr.views.get(id(p))
        regions[id(p)] = v[2] if v is not None and v[0] is p else None
        if p.dim() > ref.dim():
            return None
        padded = p.detach().reshape((1,) * (ref.dim() - p.dim()) + tuple(p.shape))
        if padded.shape[bd] != 1:
            return None
        shape = list(padded.shape)
        shape[bd] = B
        leaf = padded.expand(shape).requires_grad_()
        leaves[id(p)] = (p, leaf, padded.shape)

    out = func(*replace_in(args, leaves), **replace_in(kwargs, leaves))
    if not isinstance(out, Tensor) or out.shape != ref.shape:
        return None
    for p, leaf, padded_shape in leaves.values():
        base, region = tr.base_param(p), regions[id(p)]
        cap = Capture(tr, 1, _expand_builder(base, padded_shape, bd, p.shape, region),
                      [base], tuple(c.call_id for c in tr.stack))
        leaf.register_hook(cap.hook(0))
    if explicit:
        tr.mark_batched(out, bd, batchdim.VIRTUAL)
    return out

def _any_batched(tr: Tracer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(t, Tensor) and batchdim.read(t, tr.batch_token)[0]
               for t in flat((args, kwargs)))

def _batch_at(tr: Tracer, args: tuple[Any, ...], kwargs: dict[str, Any], bd: int, ref: Tensor) -> bool:
    """Whether every batched operand has its batch at ``ref``'s dimension ``bd`` (and one has)."""
    seen = False
    for t in flat((args, kwargs)):
        if not isinstance(t, Tensor):
            continue
        carries, d = batchdim.read(t, tr.batch_token)
        if not carries:
            continue
        if d is None or d + ref.dim() - t.dim() != bd:
            return False
        seen = True
    return seen


def _expand_builder(
    p: Tensor, padded_shape: torch.Size, bd: int, used_shape: torch.Size,
    region: tuple[slice, ...] | None,
) -> Build:
    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        sum_dims = [i for i, s in enumerate(padded_shape) if s == 1 and i != bd and g.shape[i] != 1]
        if sum_dims:
            g = g.sum(sum_dims, keepdim=True)
        g = g.movedim(bd, 0)
        return [PerSampleGrads(p, g.reshape(g.shape[0], *used_shape), region=region)]

    return build


