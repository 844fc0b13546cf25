"""How the traced operands of one op line up: what the per-op rules cannot see alone.

The rules of :mod:`swiftdp.clipping.loss_forms` read an op's result from its
first traced operand. Two things need every operand:

* **values without gradient.** ``o.detach()``, ``o.data``, a result under
  ``torch.no_grad()`` or an argmax is a constant to autograd, so no
  derivative check sees it. One example's own (rows that line up with the
  result) is a target, mask or weight, as a label is; one reduced over the
  batch (``o.detach().mean(0)``), taken from other examples' rows, or fed to
  an op that is not entry by entry (``F.linear(o, o.detach())``, an in-batch
  similarity against stop-gradient keys) makes each example's term depend on
  the others: ``coupled``;
* **broadcasting.** In an entry-by-entry op the operands are aligned from the
  right, so ``o + o.detach()[:, None]`` puts the batch on two axes of the
  result: each traced operand's batch axis must land on the same axis.

It also watches writes into the outputs through an alias (``m = o.detach();
m -= m.mean(0)`` changes ``o`` itself without autograd seeing it), and holds
the rules of the ops over several traced operands (``where``, ``scatter``,
``cat``/``stack``, ``einsum``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.clipping.loss_trace import Context, Form, Traced, _grad_tensors, coupled, unknown

_ADDITIVE = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
             "__isub__", "sub_", "subtract"}
# ops that may take one example's own value without gradient besides the entry-by-entry
# ones: a target, an index along another dimension, a piece of a concatenation
_TAKES_ROWS = {"cross_entropy", "nll_loss", "cat", "concat", "concatenate", "stack", "gather",
               "take_along_dim", "scatter", "scatter_add", "scatter_reduce", "index_fill"}
_FIX = ("compute per-example targets, masks and weights from each example's own outputs, "
        "entry by entry")


SCATTER = {"scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
            "scatter_reduce_", "index_fill", "index_fill_"}


def scatter(name: str, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Form:
    """``x.scatter(dim, index, src)`` and friends: rows when ``dim`` is not the batch's axis
    and every traced operand holds the batch on the same axis (one example's own entries)."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    ops = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
    if not isinstance(x, Tensor) or not isinstance(dim, int) or not ops:
        return unknown(name)
    f0 = ops[0].sdp_form
    same = all(o.sdp_form.kind == "rows" and (o.sdp_form.axis, o.sdp_form.per, o.dim()) == (
        f0.axis, f0.per, x.dim()) for o in ops)
    if f0.kind != "rows" or f0.power or not same or dim % x.dim() == f0.axis:
        return unknown(f"{name} along the batch")
    return f0


def where(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Form:
    """``torch.where(cond, a, b)``: rows when every traced operand is rows of one layout.

    A traced condition (a mask computed from the outputs, detached) must be
    rows of that layout too.
    """
    ops = [a for a in args[:3] if isinstance(a, Traced)]
    branches = [a for a in args[1:3] if isinstance(a, Traced)]
    if not branches:
        return unknown("where")
    f0 = branches[0].sdp_form
    if f0.kind == "rows" and not f0.power and all(o.sdp_form.kind == "rows" for o in ops):
        return f0  # (propagate checked that the operands line up in the result)
    return unknown("where")


def joined(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Form:
    seq = args[0] if args else kwargs.get("tensors", ())
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    forms = [t.sdp_form for t in seq if isinstance(t, Traced)]
    if not forms or len(forms) != len(seq) or not isinstance(dim, int):
        return unknown(f"{name} with untraced pieces")
    f0 = forms[0]
    if f0.kind == "total" and all(f.kind == "total" and f.power == f0.power for f in forms):
        return replace(f0, relabel=any(f.relabel for f in forms), tokens=False, per=1)
    if f0.kind == "rows" and all(f == f0 for f in forms):
        ndim = seq[0].dim() + (1 if name == "stack" else 0)
        d = dim % ndim
        if name == "stack":
            return replace(f0, axis=f0.axis + (d <= f0.axis))
        if d != f0.axis:
            return f0
    return unknown(f"{name} along the batch")


def einsum(args: tuple[Any, ...]) -> Form:
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return unknown("einsum")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    letters = set()
    for term, op in zip(terms, ops, strict=False):
        if isinstance(op, Traced):
            f = op.sdp_form
            if f.kind != "rows" or f.per != 1:
                return unknown("einsum")
            letters.add(term[f.axis])
    if len(letters) != 1:
        return unknown("einsum over two batch indices")
    b = letters.pop()
    if b in rhs:
        return Form("rows", axis=rhs.index(b))
    return Form("total", power=0)


def lined_up(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
             elementwise: set[str]) -> Form | int | None:
    """What the operands of ``name`` say together.

    Returns:
        A :class:`Form` that decides the result (a value without gradient
        entering it wrongly: ``coupled``; operands broadcast across each other:
        ``unknown``, or ``coupled`` if one has no gradient); for an
        entry-by-entry op whose traced rows line up, the result's batch axis;
        else ``None``.
    """
    leaves = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
    detached = [a for a in leaves if not a.requires_grad]
    entering = bool(detached) and _grad_tensors(out)
    if entering:
        f = _detached(name, leaves, detached, elementwise)
        if f is not None:
            return f
    if name not in elementwise:
        return None
    axis = _common_axis([a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)],
                        leaves)
    if axis is False:
        if entering:
            return coupled(f"a value computed from the outputs without gradient is broadcast "
                           f"against them in `{name}` with its batch on another axis, so each "
                           f"example's term meets other examples' entries ({_FIX})")
        return unknown(f"{name} of traced values broadcast with their batch on different axes")
    return axis if isinstance(axis, int) and not isinstance(axis, bool) else None


def _detached(name: str, leaves: list[Traced], detached: list[Traced],
              elementwise: set[str]) -> Form | None:
    with_grad = [a for a in leaves if a.requires_grad]
    if name in _ADDITIVE and with_grad and all(a.sdp_form.kind == "total" for a in with_grad):
        return None  # a constant added to the reduced loss: the gradients are unchanged
    for a in detached:
        f = a.sdp_form
        if f.kind == "rows" and not f.power:
            if name in elementwise or name in _TAKES_ROWS:
                continue
            what = (f"taken whole into `{name}`, which does not work entry by entry, so each "
                    "example's term meets other examples' values (an in-batch similarity "
                    "against stop-gradient keys, F.linear(o, o.detach()))")
        else:
            what = {"total": "reduced over the batch (e.g. o.detach().mean(0), a norm of the "
                             "whole batch), so each example's term depends on the other "
                             "examples' outputs",
                    "rows": "scaled by the batch size, which one example's presence changes"
                    }.get(f.kind, f"formed through `{f.why}`, which the check does not model, "
                          "so it cannot tell whether each example's term depends on the other "
                          "examples' outputs")
        return coupled(f"a value computed from the outputs without gradient (detached, under "
                       f"torch.no_grad(), or an argmax) enters the loss through `{name}`; it "
                       f"is {what}, and no derivative shows it ({_FIX})")
    return None


def _common_axis(tensors: list[Tensor], leaves: list[Traced]) -> int | bool | None:
    """The axis of the broadcast shape that every traced rows operand's batch lands on.

    ``None``: no traced rows operand (nothing to line up) or no broadcast
    shape; ``False``: they land on different axes, or one is broadcast along it.
    """
    rows = [a for a in leaves if a.sdp_form.kind == "rows"]
    if not rows:
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None
    axes = set()
    for a in rows:
        f = a.sdp_form
        ax = f.axis + len(shape) - a.dim()
        if not 0 <= f.axis < a.dim() or ax < 0 or a.shape[f.axis] != shape[ax]:
            return False
        axes.add((ax, f.per))
    return axes.pop()[0] if len(axes) == 1 else False


def shares_an_output(t: Tensor, ctx: Context) -> bool:
    """Whether ``t`` shares memory with an output handed out at ``ctx``'s step, or with a
    traced tensor with gradient that was detached there."""
    from swiftdp.clipping.loss_writes import storage

    ptr = storage(t)
    if not ptr:
        return False
    alive = (r() for r in [*ctx.handed, *ctx.aliased])
    return any(o is not None and storage(o) == ptr for o in alive)


def write_form(target: Traced, index: Any, value: Any, indexed: Form) -> Form:
    """The form of ``target`` after ``target[index] = value`` (``indexed``: ``target[index]``'s).

    A constant (a number, a plain tensor) written anywhere keeps it
    per-example; so does one example's own value (rows) written where the
    batch is kept whole or through a mask of the target's shape. Anything
    else written into it — another example's row, a value reduced over the
    batch — couples it.
    """
    fx = target.sdp_form
    if fx.kind != "rows" or not isinstance(value, Traced):
        return fx  # a constant written anywhere holds no other example
    mask = isinstance(index, Tensor) and index.dtype == torch.bool and index.shape == target.shape
    kept = mask or indexed.kind == "rows"
    fv = value.sdp_form
    if kept and fv.kind == "rows" and not fv.power:
        return fx
    return coupled("a value is written into an output (or a tensor computed from one) where "
                   "it mixes the examples: into another example's rows, or one reduced over "
                   "the batch")
