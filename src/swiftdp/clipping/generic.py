"""The generic rule: per-example gradients of one module by ``torch.func``.

Used for any parameter that no layer rule covers and that is not a simple
broadcast over the batch (a custom layer doing arbitrary math with its
weights, weight standardisation, ...). The innermost running module that
contains the parameter is recomputed, example by example under ``vmap``, as
a function of that parameter, and the captured output gradient is pulled
back with ``vjp``. Exact, and slower than a dedicated rule. The recomputation
runs under the ``torch.autocast`` settings of the forward it repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from swiftdp.clipping import batchdim
from swiftdp.clipping.capture import Capture, ModuleCall, Source
from swiftdp.clipping.contract import Policy
from swiftdp.clipping.contributions import Contribution, PerSampleGrads
from swiftdp.clipping.rounding import AutocastState
from swiftdp.clipping.tracer import Tracer
from swiftdp.errors import UnsupportedModuleError

if TYPE_CHECKING:
    from swiftdp.clipping.engine import GradClipper


def capture_module_output(engine: GradClipper, tracer: Tracer, call: ModuleCall,
                          output: Any) -> Any:
    """Hook the outputs of a module call marked generic; returns the (possibly new) output."""
    tr = tracer
    step = tr.step
    assert step is not None
    _absorb_inner_captures(step.captures, call)
    step.generic_params[call.call_id] = set(call.generic)
    leaves, spec = pytree.tree_flatten(output)
    idx = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    if not idx:
        return None
    # The batch dimensions, tracked from the model's inputs (never read from sizes).
    token = tr.batch_token
    in_leaves = pytree.tree_leaves((call.args, call.kwargs))
    in_dims = [_tracked(t, token) for t in in_leaves]
    out_dims = [_tracked(leaves[i], token) for i in idx]
    unknown = [t for t in [*in_leaves, *(leaves[i] for i in idx)]
               if isinstance(t, Tensor) and batchdim.read(t, token) == (True, None)]
    if unknown:
        raise UnsupportedModuleError(
            f"Module `{call.path}` uses parameters {sorted(n for n, _ in _named(call))} in a "
            "way no layer rule covers, on or into a tensor whose batch dimension is no longer "
            f"known (shape {tuple(unknown[0].shape)}: the batch merged with another dimension, "
            "examples innermost, or moved by an op swiftdp does not follow), so it cannot be "
            "recomputed one example at a time. Keep the batch in its own dimension (or "
            "outermost in a reshape) around this module.")
    if all(d is None for d in in_dims) and all(d is None for d in out_dims):
        raise UnsupportedModuleError(
            f"Module `{call.path}` uses parameters {sorted(n for n, _ in _named(call))} in a "
            "way no layer rule covers, and neither its inputs nor its outputs carry the batch "
            "(tracked from the model's inputs): its parameters' gradient is the whole batch's "
            "and cannot be split per example. Compute the value from the batch inside a layer "
            "swiftdp supports, or freeze these parameters with requires_grad_(False).")
    changed = False
    for i in idx:
        if not leaves[i].requires_grad:
            t = leaves[i]
            leaves[i] = Source.apply(tr.anchor, t.clone)
            changed = True
    names = {id(p): n for n, p in call.module.named_parameters()}
    params = {names[pid]: p for pid, p in call.generic.items()}
    cap = Capture(tr, len(idx), _builder(engine, step.batch_size, call, params, idx,
                                         in_dims, out_dims),
                  list(params.values()),
                  tuple(c.call_id for c in tr.stack))
    for j, i in enumerate(idx):
        leaves[i].register_hook(cap.hook(j))
    return pytree.tree_unflatten(leaves, spec) if changed else None


def _absorb_inner_captures(captures: list[Capture], call: ModuleCall) -> None:
    """Make generic every parameter of a capture inside ``call`` that shares one with it.

    Such a capture is cancelled (its generic parameters are recomputed by
    ``call``), so its other parameters (the bias next to a weight the parent
    also uses) must be recomputed by ``call`` too, or they would lose their
    gradient.
    """
    gen = call.generic
    changed = True
    while changed:
        changed = False
        for cap in captures:
            if call.call_id in cap.call_ids and not cap.param_ids.isdisjoint(gen.keys()):
                for p in cap.params:
                    if id(p) not in gen:
                        gen[id(p)] = p
                        changed = True


def _builder(
    engine: GradClipper, batch: int, call: ModuleCall, params: dict[str, Tensor],
    out_idx: list[int], in_dims: list[int | None], out_dims: list[int | None],
) -> Any:
    module, args, kwargs = call.module, call.args, call.kwargs
    forward = AutocastState.now()  # called during the forward: its autocast, for the rerun

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        dims = list(in_dims)
        batched = [t if d is not None else None for t, d in zip(leaves, dims, strict=True)]
        gs = [torch.zeros(()) if g is None else g for g in grads]
        gdims = [None if g is None else d for g, d in zip(grads, out_dims, strict=True)]
        detached = {k: v.detach() for k, v in params.items()}

        def one(bl: list[Any], gl: list[Tensor]) -> tuple[Tensor, ...]:
            full = [
                (b.unsqueeze(d) if d is not None else t)
                for t, b, d in zip(leaves, bl, dims, strict=True)
            ]
            a, kw = pytree.tree_unflatten(full, spec)

            def f(pd: dict[str, Tensor]) -> tuple[Tensor, ...]:
                with forward.replay():
                    out = functional_call(module, pd, tuple(a), kw)
                ol = pytree.tree_leaves(out)
                return tuple(ol[i] for i in out_idx)

            res_vjp: Any = vjp(f, detached)
            outs, pull = res_vjp[0], res_vjp[1]
            cot = tuple(
                torch.zeros_like(o) if gd is None else g.unsqueeze(gd)
                for o, g, gd in zip(outs, gl, gdims, strict=True)
            )
            res = pull(cot)[0]
            return tuple(res[k] for k in params)

        with engine.suspended():
            try:
                per = vmap(one, in_dims=(dims, gdims), randomness="same")(batched, gs)
            except Exception:  # ops without batching rules: loop over examples
                rows = []
                for i in range(batch):
                    bl = [b.select(d, i) if (d is not None and b is not None) else None
                          for b, d in zip(batched, dims, strict=True)]
                    gl = [g if gd is None else g.select(gd, i) for g, gd in zip(gs, gdims, strict=True)]
                    try:
                        rows.append(one(bl, gl))
                    except Exception as e:
                        raise UnsupportedModuleError(
                            f"Module `{call.path}` uses parameters "
                            f"{sorted(params)} in a way no layer rule covers, and recomputing "
                            f"it one example at a time failed ({type(e).__name__}: {e}). "
                            "swiftdp needs each example to be computed independently of the "
                            "others; rewrite the module so that it is, or freeze these "
                            "parameters with requires_grad_(False)."
                        ) from e
                per = tuple(torch.stack(col) for col in zip(*rows, strict=True)) if rows else tuple(
                    p.new_zeros((0, *p.shape)) for p in params.values())
        return [PerSampleGrads(p, g) for p, g in zip(params.values(), per, strict=True)]

    return build


def _tracked(t: Any, token: object) -> int | None:
    """``t``'s tracked batch dimension (``None``: not a tensor, no batch, or unknown)."""
    if not isinstance(t, Tensor):
        return None
    carries, d = batchdim.read(t, token)
    return d if carries else None


def _named(call: ModuleCall) -> list[tuple[str, Tensor]]:
    names = {id(p): n for n, p in call.module.named_parameters()}
    return [(names.get(pid, "?"), p) for pid, p in call.generic.items()]

