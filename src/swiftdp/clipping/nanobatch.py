"""The nanobatch mode: every example's gradient by its own forward and backward.

Batch size one with gradient accumulation (Graphcore's NanoBatch): slow,
simple, and exact by construction — the reference the other modes are
tested against. The batched forward only produces the outputs; in the
backward each example is recomputed alone (under the forward's
``torch.autocast`` settings), its gradient clipped and added in at least
float32 (group-wise: each group's part clipped to its own threshold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from swiftdp.clipping import views
from swiftdp.clipping.clip_fns import clip_factors, nonfinite_examples, unweightable_as_inf
from swiftdp.clipping.rounding import AutocastState, compute_dtype, max_finite
from swiftdp.clipping.step import MEAN_IN_HALF
from swiftdp.errors import InvalidArgumentError

if TYPE_CHECKING:
    from swiftdp.clipping.boundary import OutputsBackward
    from swiftdp.clipping.engine import GradClipper
    from swiftdp.clipping.step import Step


def slice_example(tree: Any, i: int, batch: int, bd: int) -> Any:
    """Example ``i`` of every tensor in ``tree`` that carries the batch (kept as size 1)."""

    def f(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() > 0:
            d = bd if t.dim() > max(bd, 1) else 0
            if t.shape[d] != batch:  # e.g. a (B, T) mask of a sequence-first model
                d = next((k for k, s in enumerate(t.shape) if s == batch), -1)
            if d >= 0:
                return t.narrow(d, i, 1)
        return t

    return pytree.tree_map(f, tree)


def make_backward(
    engine: GradClipper, step: Step, module: nn.Module, args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> OutputsBackward:
    """Build the boundary callback that recomputes and clips example by example."""
    bd = 0 if engine.batch_first else 1
    forward = AutocastState.now()  # built at the end of the forward: its autocast

    def backward(outs: list[Tensor], grads: list[Tensor]) -> None:
        del outs
        reduction = step.reduction_override or engine.loss_reduction
        if reduction == "mean" and any(g.dtype in (torch.bfloat16, torch.float16) for g in grads):
            # as the other modes refuse it (clipping/step.py): (∂ℓ_i/∂out)/B rounded to 16
            # bits makes one example's presence move every other example's gradient
            raise InvalidArgumentError(MEAN_IN_HALF.format(dtype=grads[0].dtype))
        step.started = True
        params = list(step.trainable.values())
        batch = step.batch_size
        scale = step.scale(batch)
        sums = [torch.zeros(p.shape, dtype=compute_dtype(p), device=p.device) for p in params]
        # Group mode: each group's norm and factor on its own (one group for one C).
        gid = engine.group_ids(step.trainable)
        c_max = engine.max_grad_norm
        step.clipped_with = c_max  # (what every example below is clipped to)
        limits = engine.group_limits or ((c_max,) if isinstance(c_max, float) else ())
        which = [0 if gid is None else gid[id(p)] for p in params]
        norms = []
        factors = []
        with engine.suspended():
            for i in range(batch):
                a_i = slice_example(args, i, batch, bd)
                k_i = slice_example(kwargs, i, batch, bd)
                g_i = [slice_example(g, i, batch, bd) * scale for g in grads]
                if engine.augmult > 1:  # the example's views as a batch of K rows
                    a_i, k_i = views.merge_views(a_i, k_i, 1, engine.augmult, check=False)
                with forward.replay():
                    out_i = module(*a_i, **k_i)
                leaves = [t for t in pytree.tree_leaves(out_i) if isinstance(t, Tensor) and t.requires_grad]
                if engine.augmult > 1:
                    g_i = [g.reshape(t.shape) for g, t in zip(g_i, leaves, strict=True)]
                pg = torch.autograd.grad(leaves, params, g_i, allow_unused=True)
                flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, pg, strict=True)]
                sq = [torch.zeros((), dtype=torch.float64) for _ in limits]
                for g, k in zip(flat, which, strict=True):
                    sq[k] = sq[k] + (g.double() ** 2).sum()
                n = torch.stack(sq).sqrt()
                if flat:  # a norm beyond the parameters' float range counts as non-finite
                    n = torch.where(n > max_finite(flat[0].dtype), torch.inf, n)
                # and so does one whose clip factor would be subnormal
                n = torch.stack([unweightable_as_inf(nk, ck, style=engine.clipping)
                                 for nk, ck in zip(n, limits, strict=True)])
                c = torch.cat([clip_factors(nk.reshape(1), ck, engine.clipping, warn_nonfinite=False)
                               for nk, ck in zip(n, limits, strict=True)])
                c = torch.where(torch.isfinite(n).all(), c, 0.0)  # one bad group drops the example
                norms.append(n if gid is not None else n[0])
                factors.append(c if gid is not None else c[0])
                for s, g, k in zip(sums, flat, which, strict=True):
                    # a non-finite example has c = 0 and is left out exactly (0 · NaN = NaN)
                    s.add_(torch.where(c[k] > 0, g.to(s.dtype) * c[k].to(s.dtype), 0.0))
        if norms:
            stacked = torch.stack(norms)  # (B,), or (B, K) in group mode
            nonfinite_examples(stacked if gid is None else stacked.amax(1),  # one warning, counted
                               pending=engine.pending_for(stacked.device))
            dtype = compute_dtype(params[0]) if params else torch.float32
            engine.last_norms = (stacked if gid is None else stacked.t()).to(dtype)
            c_all = torch.stack(factors)
            engine.last_clip_factors = (c_all if gid is None else c_all.t()).to(dtype)
            step.norms = stacked if gid is None else stacked.t()
        step.forwards_seen.add(step.forwards)
        step.deliver({id(p): s for p, s in zip(params, sums, strict=True)})

    return backward
