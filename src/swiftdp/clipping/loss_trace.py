"""How the loss is formed from the model's outputs, read on the checked steps.

On the first step of each output signature the engine hands the model's
outputs back as :class:`Traced` tensors. Every torch operation on them runs
as usual (results are the same numbers, attached to the same graph) and
records, on the result, what it did to the batch: a :class:`Form`. When the
loss built from them is backpropagated (``loss.backward()`` or
``torch.autograd.backward``), the engine reads the loss's form and refuses

* a loss whose per-example weights depend on the batch — a reduction other
  than the declared one (``.sum()`` under ``loss_reduction="mean"``, a mean
  under ``"sum"``, ``loss * B``), a mixed sum and mean, a ``mean`` over targets
  with ``ignore_index`` entries or class weights (normalised by a count over the
  whole batch), a division by a tensor computed outside the model (a token
  count);

before any gradient flows, and then checks the loss's second derivative at
the outputs for cross-example terms (:func:`~swiftdp.clipping.loss_check.check_loss`).

What the form cannot read (an operation outside the few it models) becomes
``unknown`` and is left to the second-derivative check: the trace refuses only
what it recognises. Later steps of a checked signature get plain tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

_FIX = ("Hand over one loss per example instead — dp.backward(losses) with losses[i] "
        "example i's own loss (swiftdp.losses.per_example_cross_entropy, or "
        "swiftdp.losses.causal_lm_loss for token sequences) — or match make_private's "
        "loss_reduction to the loss.")


@dataclass(frozen=True, slots=True)
class Form:
    """What a tensor is, as a function of the batch.

    Attributes:
        kind: ``"rows"`` (entry blocks along ``axis`` belong to one example
            each), ``"total"`` (reduced over the batch: each example's terms
            weighted ``B ** power``), ``"coupled"`` (the weights depend on the
            batch: ``why`` says how) or ``"unknown"``.
        axis: for ``rows``, the dimension holding the batch.
        per: for ``rows``, the consecutive entries of ``axis`` per example
            (``B * T`` rows after flattening ``(B, T, V)`` to ``(B*T, V)``).
        power: for ``total``, the exponent of ``B`` in each example's weight
            (0: a sum, -1: a mean, 1: a mean times ``B``).
        why: for ``coupled``, the reason.
    """

    kind: str
    axis: int = 0
    per: int = 1
    power: int = 0
    why: str = ""


UNKNOWN = Form("unknown")


class Context:
    """What the forms of one checked step share: the batch and the step's hook."""

    __slots__ = ("batch", "constants", "on_backward")

    def __init__(self, batch: int, constants: frozenset[int],
                 on_backward: Callable[[Tensor, Form], None]) -> None:
        self.batch = batch
        self.constants = constants  # ids of the model's buffers and parameters
        self.on_backward = on_backward


class Traced(Tensor):
    """A model output (or a tensor computed from one) that records its :class:`Form`."""

    sdp_form: Form
    sdp_ctx: Context

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is Tensor.backward or func is torch.autograd.backward:
            root = args[0] if args else kwargs.get("tensors", kwargs.get("self"))
            if isinstance(root, Traced):
                root.sdp_ctx.on_backward(root, root.sdp_form)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not _grad_tensors(out):
            return out
        traced = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
        if not traced:
            return out
        ctx = traced[0].sdp_ctx
        try:
            form = _propagate(func, args, kwargs, out, ctx)
        except Exception:  # never let the bookkeeping break the user's code
            form = UNKNOWN
        return pytree.tree_map(lambda t: _tag(t, form, ctx), out)


def trace_outputs(output: Any, batch: int, batch_dim: int, ctx: Context) -> Any:
    """The outputs as :class:`Traced` tensors, each with its batch axis (or ``unknown``)."""
    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.requires_grad or isinstance(t, Traced):
            return t
        d = batch_dim if t.dim() > max(batch_dim, 1) else 0
        form = Form("rows", axis=d) if t.dim() > 0 and t.shape[d] == batch else UNKNOWN
        return _tag(t, form, ctx)
    return pytree.tree_map(wrap, output)


def form_of(t: Any) -> Form | None:
    """The recorded form of ``t``, or ``None`` for a plain tensor."""
    return t.sdp_form if isinstance(t, Traced) else None


def verdict(form: Form, reduction: str, batch: int) -> str | None:
    """Why a scalar loss of this form cannot be clipped as ``reduction``, or ``None``."""
    if form.kind == "coupled":
        return f"The loss couples the examples of the batch: {form.why}. {_FIX}"
    if form.kind != "total" or batch < 2:
        return None
    want = -1 if reduction == "mean" else 0
    if form.power == want:
        return None
    found = {0: "sums its examples' terms", -1: "averages its examples' terms"}.get(
        form.power, f"weights each example's term by B**{form.power} (B = {batch}, e.g. "
        "a mean multiplied by the batch size)")
    return (f"The loss {found}, but loss_reduction={reduction!r} was declared. swiftdp "
            "rescales each example's gradient by the declared reduction before clipping, "
            "so a mismatch weights every example by the batch size — which one example's "
            f"presence changes. {_FIX}")


# ------------------------------------------------------------------ internals
def _tag(t: Any, form: Form, ctx: Context) -> Any:
    if not isinstance(t, Tensor) or not t.requires_grad or not t.is_floating_point():
        return t
    with torch._C.DisableTorchFunctionSubclass():
        out = t.as_subclass(Traced) if not isinstance(t, Traced) else t
    out.sdp_form, out.sdp_ctx = form, ctx
    return out


def _grad_tensors(out: Any) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(out))


_LOSSES_CE = {"cross_entropy", "nll_loss"}
_LOSSES = _LOSSES_CE | {
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "soft_margin_loss", "poisson_nll_loss", "kl_div",
    "gaussian_nll_loss", "multilabel_soft_margin_loss",
}
_REDUCE = {"sum": 0, "mean": -1}
_ADD = {"add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__"}
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "multiply"}
_DIV = {"div", "__truediv__", "__itruediv__", "true_divide", "divide"}
_SAME = {"float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone",
         "neg", "__neg__", "negative", "positive", "__pos__"}
_ROWWISE = {"abs", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "pow", "__pow__",
            "sigmoid", "tanh", "relu", "clamp", "clip", "clamp_min", "clamp_max", "masked_fill",
            "nan_to_num", "log_sigmoid", "logsigmoid", "softplus", "gelu", "silu", "elu"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax"}
_RESHAPE = {"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"}


def _propagate(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
               ctx: Context) -> Form:
    name = getattr(func, "__name__", "")
    forms = [a.sdp_form for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
    if any(f.kind == "coupled" for f in forms):
        return next(f for f in forms if f.kind == "coupled")
    if name in _LOSSES:
        return _loss(func, name, args, kwargs, ctx)
    x = args[0] if args else None
    if not isinstance(x, Traced):
        return _reversed(name, args, ctx)
    fx = x.sdp_form
    if name in _REDUCE:
        return _reduce(name, fx, x, args, kwargs)
    if name in _ADD | _MUL | _DIV:
        return _binary(name, x, args[1] if len(args) > 1 else kwargs.get("other"), ctx)
    if name in _SAME:
        return fx
    if fx.kind == "total":
        return fx if name in _RESHAPE or name in {"squeeze", "unsqueeze"} else UNKNOWN
    if fx.kind != "rows":
        return UNKNOWN
    if name in _ROWWISE:
        return fx
    if name in _SOFTMAX:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return fx if isinstance(dim, int) and dim % x.dim() != fx.axis else UNKNOWN
    if name in _RESHAPE and isinstance(out, Tensor):
        return _reshaped(fx, tuple(x.shape), tuple(out.shape), ctx.batch)
    if name in {"transpose", "swapaxes", "swapdims"} and len(args) >= 3:
        d0, d1 = args[1] % x.dim(), args[2] % x.dim()
        axis = d1 if fx.axis == d0 else d0 if fx.axis == d1 else fx.axis
        return replace(fx, axis=axis)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else tuple(args[1])
        return replace(fx, axis=[d % x.dim() for d in dims].index(fx.axis))
    if name == "unsqueeze":
        d = args[1] % (x.dim() + 1)
        return replace(fx, axis=fx.axis + (d <= fx.axis))
    if name in {"__getitem__", "select", "narrow", "gather", "take_along_dim", "squeeze"}:
        return _indexed(name, fx, x, args, out)
    return UNKNOWN


def _reversed(name: str, args: tuple[Any, ...], ctx: Context) -> Form:
    """``c * traced`` and friends, with the traced tensor second."""
    y = args[1] if len(args) > 1 else None
    if not isinstance(y, Traced):
        return UNKNOWN
    if name in _MUL or name in {"add", "__add__", "__radd__"}:
        return _binary(name, y, args[0], ctx)
    return UNKNOWN


@cache
def _signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _loss(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
          ctx: Context) -> Form:
    sig = _signature(func)
    if sig is None:
        return UNKNOWN
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a.get("size_average") is not None or a.get("reduce") is not None:
        return UNKNOWN
    pred = a.get("input")
    fp = pred.sdp_form if isinstance(pred, Traced) else None
    if fp is None or fp.kind != "rows":
        return UNKNOWN
    reduction = a.get("reduction", "mean")
    if reduction == "none":
        return fp if fp.axis == 0 else UNKNOWN
    if reduction == "sum":
        return Form("total", power=0)
    if name in _LOSSES_CE and reduction == "mean":
        target = a.get("target")
        if a.get("weight") is not None:
            return Form("coupled", why=f"{name}(reduction='mean', weight=...) divides by "
                        "the sum of the class weights of every target in the batch")
        ignore = a.get("ignore_index", -100)
        if (isinstance(target, Tensor) and not target.is_floating_point()
                and bool((target == ignore).any())):
            return Form("coupled", why=f"{name}(reduction='mean') with targets equal to "
                        f"ignore_index={ignore} divides by the number of the other targets "
                        "in the whole batch (a token mean over the batch), so each example's "
                        "weight depends on the other examples' labels")
    if reduction in ("mean", "batchmean"):
        return Form("total", power=-1)
    return UNKNOWN


def _dims(args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int] | None:
    dim = args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else kwargs.get(
        "dim", kwargs.get("axis"))
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % max(ndim, 1) for d in dims] if dims else None


def _reduce(name: str, fx: Form, x: Tensor, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Form:
    if fx.kind == "total":
        return fx  # a reduction over the non-batch entries: a constant factor
    if fx.kind != "rows":
        return UNKNOWN
    dims = _dims(args, kwargs, x.dim())
    if dims is None or fx.axis in dims:
        return Form("total", power=_REDUCE[name])
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    return replace(fx, axis=fx.axis if keep else fx.axis - sum(d < fx.axis for d in dims))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _binary(name: str, x: Traced, other: Any, ctx: Context) -> Form:
    fx = x.sdp_form
    c = _number(other)
    if isinstance(other, Traced):
        fo = other.sdp_form
        if fx.kind == fo.kind == "rows":
            return fx if (fx.axis, fx.per) == (fo.axis, fo.per) else UNKNOWN
        if fx.kind == fo.kind == "total" and name in _ADD:
            if fx.power == fo.power:
                return fx
            return Form("coupled", why="it adds a sum over the batch to a mean over the batch")
        return UNKNOWN
    if c is not None:
        if fx.kind != "total" or name in _ADD:
            return fx
        if c == ctx.batch:
            return replace(fx, power=fx.power + (1 if name in _MUL else -1))
        return fx
    if not isinstance(other, Tensor):
        return UNKNOWN
    if fx.kind == "rows":
        d = fx.axis - (x.dim() - other.dim())
        if d >= 0 and other.shape[d] == x.shape[fx.axis] > 1:
            return fx  # per-example weights, a mask or a per-example count
    if name in _DIV and not other.requires_grad and id(other) not in ctx.constants:
        return Form("coupled", why="it is divided by a tensor computed outside the model "
                    f"(shape {tuple(other.shape)}; e.g. a count of the batch's tokens), which "
                    "can depend on every example. Divide by a Python number if it is a "
                    "constant")
    return fx


def _reshaped(fx: Form, old: tuple[int, ...], new: tuple[int, ...], batch: int) -> Form:
    outer = 1
    for n in old[:fx.axis]:
        outer *= n
    acc = 1
    for k, n in enumerate(new):
        if acc == outer:
            if outer == 1 and n % batch == 0 and n > 0:
                return Form("rows", axis=k, per=n // batch)
            if n == old[fx.axis]:
                return replace(fx, axis=k)
            if n != 1:
                return UNKNOWN
        acc *= n
        if acc > outer:
            return UNKNOWN
    return UNKNOWN


def _indexed(name: str, fx: Form, x: Tensor, args: tuple[Any, ...], out: Any) -> Form:
    if not isinstance(out, Tensor):
        return UNKNOWN
    if name == "__getitem__":
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if Ellipsis in idx:
            pos = idx.index(Ellipsis)
            tail = idx[pos + 1:]
            lead = idx[:pos]
            if (all(i == slice(None) for i in lead) and None not in tail
                    and all(isinstance(i, (int, slice)) for i in tail)
                    and x.dim() - len(tail) > fx.axis):
                return fx
            return UNKNOWN
        head = idx[:fx.axis + 1]
        if all(i == slice(None) for i in head) and all(
                isinstance(i, (int, slice)) for i in idx):
            return fx
        return UNKNOWN
    if name == "squeeze":
        dims = [d for d, n in enumerate(x.shape) if n == 1]
        if len(args) > 1:
            want = args[1] if isinstance(args[1], (tuple, list)) else [args[1]]
            dims = [d % x.dim() for d in want if x.shape[d % x.dim()] == 1]
        if fx.axis in dims:
            return UNKNOWN
        return replace(fx, axis=fx.axis - sum(d < fx.axis for d in dims))
    dim = args[1] if len(args) > 1 else None
    if not isinstance(dim, int) or dim % x.dim() == fx.axis:
        return UNKNOWN
    if name == "select" and dim % x.dim() < fx.axis:
        return replace(fx, axis=fx.axis - 1)
    return fx
