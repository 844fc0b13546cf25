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
m -= m.mean(0)`` changes ``o`` itself without autograd seeing it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.clipping.loss_trace import Context, Form, Traced, coupled, unknown

_ADDITIVE = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
             "__isub__", "sub_", "subtract"}
# ops that may take one example's own value without gradient besides the entry-by-entry
# ones: a target, an index along another dimension, a piece of a concatenation
_TAKES_ROWS = {"cross_entropy", "nll_loss", "cat", "concat", "concatenate", "stack", "gather",
               "take_along_dim", "scatter", "scatter_add", "scatter_reduce", "index_fill"}
_FIX = ("compute per-example targets, masks and weights from each example's own outputs, "
        "entry by entry")


def requires_grad(out: Any) -> bool:
    """Whether any tensor in ``out`` requires grad."""
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(out))


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
    entering = bool(detached) and requires_grad(out)
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
    from swiftdp.clipping.loss_trace import _storage

    ptr = _storage(t)
    if not ptr:
        return False
    alive = (r() for r in [*ctx.handed, *ctx.aliased])
    return any(o is not None and _storage(o) == ptr for o in alive)


def write_form(target: Traced, index: Any, value: Any, indexed: Form) -> Form:
    """The form of ``target`` after ``target[index] = value`` (``indexed``: ``target[index]``'s).

    A constant written where the batch is kept whole, or through a mask of
    the target's own shape, keeps it per-example; so does one example's own
    value (rows). Anything else written into it — another example's row, a
    value reduced over the batch — couples it.
    """
    fx = target.sdp_form
    if fx.kind != "rows":
        return fx
    mask = isinstance(index, Tensor) and index.dtype == torch.bool and index.shape == target.shape
    kept = mask or indexed.kind == "rows"
    fv = value.sdp_form if isinstance(value, Traced) else None
    if kept and (fv is None or (fv.kind == "rows" and not fv.power)):
        return fx
    return coupled("a value is written into an output (or a tensor computed from one) where "
                   "it mixes the examples: into another example's rows, or one reduced over "
                   "the batch")
