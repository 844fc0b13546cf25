"""Writes from the outputs into other tensors, followed by the loss trace.

An in-place op, an ``out=`` argument or an item assignment can move a value
computed from the outputs into a tensor the trace does not see: a plain
tensor (``z.add_(o.detach().mean(0))``, a class-centroid table, a buffer)
becomes a :class:`~swiftdp.clipping.loss_trace.Traced` one holding the
value's form, and so does the base of a view written in place and a plain
tensor sharing its memory; a write that mixes examples into memory shared
with an output (``m = o.detach(); m -= m.mean(0)``) poisons the step's
trace, since the output itself changed where neither its form nor autograd
shows it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from swiftdp.clipping.loss_trace import (
    _CARRIED,
    Context,
    Form,
    Traced,
    coupled,
    unknown,
)


def wrote(ctx: Context, t: Tensor, form: Form, op: str) -> None:
    """An op of a pending step wrote ``form`` into ``t`` (in place, or as ``out=``).

    A plain tensor written from the outputs (``z.add_(o.detach().mean(0))``,
    ``torch.mean(o.detach(), 0, out=z)``, a class-centroid table) becomes a
    traced one, so the batch statistic it now holds is seen where it is used;
    an alias of an output written with values across the examples poisons the
    step.
    """
    with torch._C.DisableTorchFunctionSubclass():
        base = t._base  # a view written in place writes its base too (the user's object)
    if type(t) is Tensor:
        t.__class__ = Traced  # (the user's own object: a new wrapper would leave it plain)
        if form.kind != "rows":
            ctx.written.append(t)
    if isinstance(t, Traced):
        t.sdp_form, t.sdp_ctx = form, ctx
    if isinstance(base, Tensor) and form.kind != "rows" and type(base) in (Tensor, Traced):
        retag(base, form if form.kind == "coupled" else unknown(
            f"{op} into a view of it, from the outputs"), ctx)
    if form.kind != "rows":
        poison_if_output(ctx, t, op)


def storage(t: Tensor) -> int:
    """The address of ``t``'s memory (0 where it has none to read)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def written(ctx: Context, args: tuple[Any, ...], carried: bool = False) -> None:
    """``target[index] = value`` with a traced tensor in it: the target's form after the write."""
    from swiftdp.clipping.loss_forms import propagate
    from swiftdp.clipping.loss_operands import write_form

    target, index, value = (*args, None, None, None)[:3]
    if not isinstance(target, Tensor) or (not ctx.live() and not target.requires_grad):
        return
    try:
        if carried:
            form = coupled(_CARRIED)
        elif not isinstance(target, Traced) and _own_rows(target, index, value):
            form = Form("rows")  # target[arange(B), per-example index] = a constant
        elif not isinstance(target, Traced):  # a plain tensor filled from the outputs
            whole = index is Ellipsis or index == slice(None)
            fv = value.sdp_form if isinstance(value, Traced) else None
            form = fv if whole and fv is not None and fv.kind == "rows" and isinstance(
                value, Tensor) and value.shape == target.shape else (
                fv if fv is not None and fv.kind == "coupled" else unknown(
                    "__setitem__ into a plain tensor (write per-example values with "
                    "torch.where(mask, value, target) or target[:] = value)"))
        else:
            with torch._C.DisableTorchFunctionSubclass():
                view = target.as_subclass(Tensor)[index]
            indexed = propagate(Tensor.__getitem__, (target, index), {}, view, ctx.batch, ctx)
            form = write_form(target, index, value, indexed)
    except Exception:  # never let the bookkeeping break the user's code
        form = unknown("__setitem__")
    if ctx.live():
        wrote(ctx, target, form, "__setitem__")


def _own_rows(target: Tensor, index: Any, value: Any) -> bool:
    """``target[torch.arange(B), idx] = c``: each example writes a constant into its own row."""
    if isinstance(value, Traced) or not isinstance(index, tuple) or len(index) < 2:
        return False
    rows, rest = index[0], index[1:]
    n = target.shape[0] if target.dim() else 0
    if not isinstance(rows, Tensor) or isinstance(rows, Traced) or rows.shape != (n,):
        return False
    with torch._C.DisableTorchFunctionSubclass():
        if not torch.equal(rows.cpu(), torch.arange(n)):
            return False
    return all(not isinstance(i, Traced) or (i.sdp_form.kind == "rows" and i.sdp_form.axis == 0
                                             and i.shape == (n,)) for i in rest)


def shared_with_written(ctx: Context, leaves: list[Any]) -> None:
    """Plain operands sharing memory with a tensor written from the outputs become traced."""
    written = {storage(w) for w in ctx.written}
    written.discard(0)
    for a in leaves:
        if type(a) is Tensor and storage(a) in written:
            retag(a, unknown("a tensor sharing memory with one written from the outputs"), ctx)


def retag(t: Tensor, form: Form, ctx: Context) -> None:
    """Make the user's own tensor object ``t`` a :class:`Traced` one of ``form``."""
    t.__class__ = Traced
    traced: Any = t
    traced.sdp_form, traced.sdp_ctx = form, ctx


def poison_if_output(ctx: Context, t: Tensor, op: str) -> None:
    """An in-place op left ``t`` mixing the examples: if ``t`` shares memory with an output
    or a tensor computed from one (``o.detach()``, ``o.data``, a view, under ``no_grad``
    too), that tensor changed, and neither its form nor autograd may show it."""
    from swiftdp.clipping.loss_operands import shares_an_output

    if not ctx.poisoned and shares_an_output(t, ctx):
        ctx.poisoned = (f"`{op}` in place on an alias of a model output (o.detach(), o.data, "
                        "a view) changed the output itself with values across the examples, "
                        "which its trace and autograd do not see")
