"""The rules of the loss trace: the :class:`~swiftdp.clipping.loss_trace.Form` of an op's result.

Each rule reads the forms of the traced operands and the op's arguments and
says what the result is as a function of the batch. Anything not modelled
here is ``unknown`` (named by the op), which the scalar loss path refuses:
the rules only ever have to be right about what they claim.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.clipping import loss_operands as operands
from swiftdp.clipping.loss_trace import Context, Form, Traced, coupled, unknown

_LOSSES_CE = {"cross_entropy", "nll_loss"}
# losses of an input and a target of the same shape, entry by entry
_LOSSES_ELEMENTWISE = {
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "soft_margin_loss", "poisson_nll_loss", "kl_div",
    "gaussian_nll_loss", "multilabel_soft_margin_loss",
}
_LOSSES = _LOSSES_CE | _LOSSES_ELEMENTWISE | {"ctc_loss"}
_REDUCE = {"sum": 0, "mean": -1, "nansum": 0}
_ADD = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
        "__isub__", "sub_", "subtract"}
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"}
_DIV = {"div", "__truediv__", "__itruediv__", "div_", "true_divide", "divide"}
_SAME = {"float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone",
         "neg", "__neg__", "negative", "positive", "__pos__", "detach", "detach_", "cpu", "cuda",
         "long", "int", "short", "bool", "byte", "char", "requires_grad_"}
# elementwise comparisons and logic: a mask of each example's own entries
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le", "__eq__", "__ne__", "__gt__", "__ge__",
            "__lt__", "__le__", "greater", "greater_equal", "less", "less_equal", "not_equal",
            "logical_and", "logical_or", "logical_xor", "__and__", "__or__", "__xor__",
            "__rand__", "__ror__", "__rxor__", "bitwise_and", "bitwise_or", "bitwise_xor"}
# along one dimension of each example (the dimension's position, its default)
_ALONG = {"argmax": (1, None), "argmin": (1, None), "sort": (1, -1), "argsort": (1, -1),
          "topk": (2, -1), "cumsum": (1, None), "cumprod": (1, None),
          "logcumsumexp": (1, None), "cummax": (1, None), "cummin": (1, None)}
_ROWWISE = {"abs", "exp", "log", "log1p", "log2", "sqrt", "rsqrt", "square", "pow", "__pow__",
            "sigmoid", "tanh", "relu", "clamp", "clip", "clamp_min", "clamp_max", "clamp_",
            "masked_fill", "nan_to_num", "log_sigmoid", "logsigmoid", "softplus", "gelu",
            "silu", "elu", "reciprocal", "sin", "cos", "exp_", "abs_", "where", "one_hot",
            "logical_not", "__invert__", "bitwise_not", "isnan", "isinf", "isfinite", "sign",
            "floor", "ceil", "round", "trunc"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "normalize"}
_DIMREDUCE = {"logsumexp", "norm", "amax", "amin", "max", "min", "cosine_similarity", "prod",
              "std", "var"}
_RESHAPE = {"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten"}
# entry by entry on operands broadcast together (each traced one must line up in the result)
_ELEMENTWISE = ((_ADD | _MUL | _DIV | _COMPARE | _ROWWISE | _LOSSES_ELEMENTWISE
                 | {"masked_fill", "masked_fill_", "lerp", "maximum", "minimum", "fmax", "fmin",
                    "atan2", "hypot", "xlogy", "copysign", "cosine_similarity",
                    "pairwise_distance"}) - {"one_hot"})
# ops linear in their traced operand: a factor B**power passes through them
_LINEAR = (set(_REDUCE) | _ADD | _MUL | _DIV | _SAME | _RESHAPE
           | {"transpose", "permute", "unsqueeze", "squeeze", "__getitem__"})


def propagate(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
              batch: int, ctx: Context | None = None) -> Form:
    """The form of ``func(*args, **kwargs) == out`` from its traced operands' forms.

    ``ctx`` (the step's trace context) may take a data-dependent verdict to
    check later instead of reading it now (a sync-free step, ``Context.defer``).
    """
    name = getattr(func, "__name__", "") or repr(func)
    forms = [a.sdp_form for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
    for f in forms:
        if f.kind == "coupled":
            return f
    if ctx is not None and ctx.poisoned:
        return coupled(ctx.poisoned)
    lined = operands.lined_up(name, args, kwargs, out, _ELEMENTWISE) if forms else None
    if isinstance(lined, Form):
        return lined
    form = _rule(func, name, args, kwargs, out, batch, ctx)
    if not isinstance(lined, int) or not isinstance(out, Tensor) or out.dim() <= lined:
        return form
    if form.kind == "rows":
        return replace(form, axis=lined)  # where the operands' batch landed in the result
    if form.kind == "unknown" and name not in _ADD | _MUL | _DIV and all(
            f.kind == "rows" and not f.power for f in forms):
        # entry by entry, every traced operand one example's rows on the same axis
        # (torch.lerp, torch.maximum with a plain or per-example operand)
        return Form("rows", axis=lined, per=next(f.per for f in forms))
    return form


def _rule(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
          batch: int, ctx: Context | None) -> Form:
    """The result's form by the op's own rule (its operands lined up: :func:`propagate`)."""
    if name in _LOSSES:
        return _loss(func, name, args, kwargs, ctx)
    if name in ("cat", "concat", "concatenate", "stack"):
        return operands.joined(name, args, kwargs)
    if name == "einsum":
        return operands.einsum(args)
    if name == "nanmean":
        return coupled("nanmean divides by the number of non-NaN entries across the batch")
    if name == "where":
        return operands.where(args, kwargs)
    x = args[0] if args else kwargs.get("input")
    src = args[1] if len(args) > 1 else kwargs.get("src")
    if name == "copy_" and isinstance(src, Traced) and isinstance(x, Tensor) and (
            src.sdp_form.kind == "rows" and tuple(src.shape) == tuple(x.shape)):
        return src.sdp_form  # the values of each example's own rows, copied whole
    if name in operands.SCATTER:
        return operands.scatter(name, x, args, kwargs)
    if not isinstance(x, Traced):
        if name == "__getitem__" and len(args) > 1 and isinstance(args[1], Traced) and (
                args[1].sdp_form.kind == "rows" and isinstance(x, Tensor)):
            return args[1].sdp_form  # a plain table looked up by each example's own index
        return _reversed(name, args, batch)
    fx = x.sdp_form
    if fx.kind == "unknown":
        return fx
    if fx.kind == "rows" and fx.power and name not in _LINEAR:
        return unknown(f"{name} of a value scaled by the batch size")
    if name in _REDUCE:
        return _reduce(name, fx, x, args, kwargs)
    if name in _ADD | _MUL | _DIV:
        return _binary(name, x, args[1] if len(args) > 1 else kwargs.get("other"), batch)
    if name in _COMPARE:  # elementwise, as an addition is
        return _binary("add", x, args[1] if len(args) > 1 else kwargs.get("other"), batch)
    if name == "__get__" and func == _DATA:  # out.data: the values, detached
        return fx
    if name in {"roll", "flip"} and fx.kind == "rows":
        dims = args[2] if name == "roll" and len(args) > 2 else args[1] if (
            name == "flip" and len(args) > 1) else kwargs.get("dims")
        dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else None
        if dims is None or fx.axis in [d % x.dim() for d in dims]:
            return unknown(f"{name} along the batch")
        return fx
    if name in _ALONG and fx.kind == "rows":
        pos, default = _ALONG[name]
        dim = args[pos] if len(args) > pos else kwargs.get("dim", default)
        if not isinstance(dim, int) or dim % max(x.dim(), 1) == fx.axis:
            return unknown(f"{name} over the batch")
        if name in {"argmax", "argmin"} and not kwargs.get("keepdim", len(args) > 2 and args[2]):
            return replace(fx, axis=fx.axis - int(dim % x.dim() < fx.axis))
        return fx
    if name in _SAME:
        return fx
    if fx.kind == "total":
        if name in _RESHAPE or name in {"squeeze", "unsqueeze", "expand"}:
            return fx
        return unknown(f"{name} of the reduced loss")
    if name in _ROWWISE:
        return fx if name != "where" else unknown(name)
    if name in _SOFTMAX or name in _DIMREDUCE:
        pos = 2 if name == "cosine_similarity" else 1
        dim = args[pos] if len(args) > pos else kwargs.get("dim", 1 if pos == 2 else None)
        if name == "normalize" and dim is None:
            dim = 1
        if not isinstance(dim, int) or dim % x.dim() == fx.axis:
            return unknown(f"{name} over the batch")
        if name in _SOFTMAX:
            return fx
        keep = bool(kwargs.get("keepdim", args[pos + 1] if len(args) > pos + 1 and isinstance(
            args[pos + 1], bool) else False))
        return replace(fx, axis=fx.axis - (0 if keep else int(dim % x.dim() < fx.axis)))
    if name in {"linear"}:
        return fx if fx.axis < x.dim() - 1 else unknown("linear over the batch")
    if name in {"split", "chunk", "tensor_split", "unbind"}:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if isinstance(dim, int) and dim % x.dim() != fx.axis:
            return fx if name != "unbind" else replace(
                fx, axis=fx.axis - int(dim % x.dim() < fx.axis))
        return unknown(f"{name} along the batch")
    if name in _RESHAPE and isinstance(out, Tensor):
        return _reshaped(fx, tuple(x.shape), tuple(out.shape), batch, name)
    if name in {"transpose", "swapaxes", "swapdims", "t"}:
        d0, d1 = (args[1] % x.dim(), args[2] % x.dim()) if len(args) >= 3 else (0, 1)
        return replace(fx, axis=d1 if fx.axis == d0 else d0 if fx.axis == d1 else fx.axis)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else tuple(args[1])
        return replace(fx, axis=[d % x.dim() for d in dims].index(fx.axis))
    if name in {"movedim", "moveaxis"} and isinstance(out, Tensor):
        order = list(range(x.dim()))
        src, dst = args[1] % x.dim(), args[2] % x.dim()
        order.insert(dst, order.pop(src))
        return replace(fx, axis=order.index(fx.axis))
    if name == "unsqueeze":
        d = args[1] % (x.dim() + 1)
        return replace(fx, axis=fx.axis + (d <= fx.axis))
    if name in {"expand", "expand_as", "broadcast_to"} and isinstance(out, Tensor):
        return replace(fx, axis=fx.axis + out.dim() - x.dim())
    if name in {"__getitem__", "select", "narrow", "gather", "take_along_dim", "squeeze"}:
        return _indexed(name, fx, x, args, out, kwargs)
    if name in {"matmul", "__matmul__", "mm", "bmm"}:
        other = args[1] if len(args) > 1 else None
        if not isinstance(other, Traced) and isinstance(other, Tensor) and (
                x.dim() >= 2 and fx.axis < x.dim() - 1 and other.dim() == 2):
            return fx  # each example's rows times a shared matrix
    return unknown(name)


def _reversed(name: str, args: tuple[Any, ...], batch: int) -> Form:
    """``c * traced``, ``plain + traced`` and friends, with the traced operand second."""
    y = args[1] if len(args) > 1 else None
    if not isinstance(y, Traced):
        return unknown(name)
    if y.sdp_form.kind == "unknown":
        return y.sdp_form
    if name in _MUL or name in _ADD:
        return _binary(name, y, args[0], batch)
    if name in _DIV and y.sdp_form.kind == "rows" and _number(args[0]) is not None:
        return y.sdp_form  # c / rows: elementwise
    return unknown(name)


@cache
def _signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _loss(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
          ctx: Context | None = None) -> Form:
    sig = _signature(func)
    if sig is None:
        return unknown(name)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a.get("size_average") is not None or a.get("reduce") is not None:
        return unknown(f"{name} with size_average/reduce")
    pred = a.get("input", a.get("log_probs"))
    if not isinstance(pred, Traced) and isinstance(a.get("target"), Traced):
        pred = a.get("target")  # the model's output passed as the target (mse(t, out))
    fp = pred.sdp_form if isinstance(pred, Traced) else None
    reduction = a.get("reduction", "mean")
    target = a.get("target")
    if isinstance(target, Traced) and target is not pred and name in _LOSSES_CE and fp is not None:
        ft = target.sdp_form  # (elementwise losses: propagate lined their operands up)
        if ft.kind != "rows" or (ft.axis, ft.per) != (fp.axis, fp.per):
            return unknown(f"{name} with a target whose batch is on another axis")
    int_target = isinstance(target, Tensor) and not target.is_floating_point()
    if name in _LOSSES_CE and reduction == "mean":
        if a.get("weight") is not None:
            return coupled(f"{name}(reduction='mean', weight=...) divides by the sum of the "
                           "class weights of every target in the batch")
        ignore = a.get("ignore_index", -100)
        if int_target:
            why = (f"{name}(reduction='mean') with targets equal to "
                   f"ignore_index={ignore} divides by the number of the other targets "
                   "in the whole batch (a token mean over the batch), so each example's "
                   "weight depends on the other examples' labels")
            hit = (target == ignore).any()
            # A sync-free step checks the flag before it delivers its sums (the
            # copy is started now, read at the end of the backward); else read now.
            deferred = ctx is not None and ctx.defer is not None and ctx.defer(hit, why)
            if not deferred and bool(hit):
                return coupled(why)
    if fp is None or fp.kind != "rows" or fp.power:
        return fp if fp is not None and fp.kind == "unknown" else unknown(name)
    axis = 1 if name == "ctc_loss" else 0
    tokens = name in _LOSSES_CE and isinstance(pred, Tensor) and (
        fp.per > 1 or pred.dim() > 2)
    if reduction == "none":
        return replace(fp, tokens=tokens) if fp.axis == axis else unknown(
            f"{name} with the batch on another axis")
    if reduction == "sum":
        per = _entries(pred, fp) if tokens and isinstance(pred, Tensor) else 1
        return Form("total", power=0, per=per, tokens=tokens)
    if reduction == "batchmean" and (fp.axis != 0 or fp.per != 1):
        return unknown("kl_div(reduction='batchmean') with the batch not first")
    if reduction in ("mean", "batchmean"):
        return Form("total", power=-1, relabel=tokens and int_target)
    return unknown(f"{name}(reduction={reduction!r})")


def _entries(x: Tensor, fx: Form) -> int:
    """Entries of ``x`` per example (``x`` rows of form ``fx``)."""
    b = max(x.shape[fx.axis] // max(fx.per, 1), 1)
    return max(x.numel() // b, 1)


def _reduce(name: str, fx: Form, x: Tensor, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Form:
    if fx.kind == "total":
        return fx  # a reduction over the non-batch entries: a constant factor
    dim = args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else kwargs.get(
        "dim", kwargs.get("axis"))
    dims = None if dim is None else [dim] if isinstance(dim, int) else list(dim)
    if not dims or fx.axis in [d % max(x.dim(), 1) for d in dims]:
        per = _entries(x, fx) if fx.tokens and not dims else 1
        return Form("total", power=fx.power + _REDUCE[name], per=per, tokens=fx.tokens,
                    relabel=fx.relabel)
    dims = [d % x.dim() for d in dims]
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    return replace(fx, axis=fx.axis if keep else fx.axis - sum(d < fx.axis for d in dims))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _binary(name: str, x: Traced, other: Any, batch: int) -> Form:
    fx = x.sdp_form
    if isinstance(other, Traced):
        fo = other.sdp_form
        if fo.kind == "unknown":
            return fo
        if fx.kind == fo.kind == "rows":
            return fx if (fx.axis, fx.per) == (fo.axis, fo.per) else unknown(
                f"{name} of outputs with different batch layouts")
        if fx.kind == fo.kind == "total" and name in _ADD:
            if fx.power == fo.power:
                return replace(fx, relabel=fx.relabel or fo.relabel)
            return coupled("it adds a sum over the batch to a mean over the batch")
        if {fx.kind, fo.kind} == {"rows", "total"}:
            return coupled(f"`{name}` combines each example's entries with a value reduced "
                           "over the batch")
        return unknown(f"{name} of two traced values")
    tensor0 = isinstance(other, Tensor) and other.dim() == 0 and not other.requires_grad
    count = tensor0 and not (other.is_floating_point() or other.is_complex())
    if tensor0:
        other = other.item()  # a 0-dim factor is read as the number it holds
    c = _number(other)
    if c is not None:
        if name in _ADD:
            return fx
        if c == batch:
            return replace(fx, power=fx.power + (1 if name in _MUL else -1))
        if name in _MUL and abs(c * batch - 1.0) <= 1e-6:  # (1/B rounded to float32 too)
            return replace(fx, power=fx.power - 1)  # × 1/B is a mean, as ÷ B (review: 1.8 C)
        token_sum = fx.kind == "total" and fx.power == 0 and fx.tokens
        if token_sum and name in _DIV and c == batch * fx.per:
            return replace(fx, power=-1)
        if token_sum and name in _MUL and c * batch * fx.per == 1:
            return replace(fx, power=-1)
        if name in _DIV and (count or tensor0):
            return coupled(f"it is divided by a 0-dim tensor ({c:g}) computed outside the "
                           "model — a count of the batch's examples or tokens makes each "
                           "example's weight depend on the others; divide by a Python number "
                           "if it is a constant")
        if token_sum and (name in _DIV or c != 1):
            return coupled(f"a sum of per-token losses is scaled by {c:g} ({name}), neither by "
                           f"the batch size {batch} nor by its {batch * fx.per} token "
                           "positions — a count of the batch's real tokens makes each "
                           "example's weight depend on the others")
        return fx
    if not isinstance(other, Tensor):
        return unknown(name)
    if fx.kind == "rows":
        lead = max(0, other.dim() - x.dim())
        d = fx.axis - (x.dim() - other.dim())
        if d >= 0 and other.shape[d] == x.shape[fx.axis] > 1:
            return replace(fx, axis=fx.axis + lead)  # per-example weights, a mask, a count
        if lead:
            return replace(fx, axis=fx.axis + lead)  # broadcast to more leading dimensions
    if name in _DIV and not (other.is_floating_point() or other.is_complex()):
        return coupled(f"it is divided by an integer tensor of shape {tuple(other.shape)} "
                       "computed outside the model (a count), which can depend on every example")
    return fx  # a constant factor: a temperature, a prior, a loss scale


def _reshaped(fx: Form, old: tuple[int, ...], new: tuple[int, ...], batch: int,
              name: str) -> Form:
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
                break
        acc *= n
        if acc > outer:
            break
    return unknown(f"{name} that splits the batch")


_FULL = slice(None)
_DATA = Tensor.data.__get__  # type: ignore[attr-defined]


def _indexed(name: str, fx: Form, x: Tensor, args: tuple[Any, ...], out: Any,
             kwargs: dict[str, Any]) -> Form:
    if not isinstance(out, Tensor):
        return unknown(name)
    if name == "__getitem__":
        return _item(fx, x, args[1])
    if name == "squeeze":
        dims = [d for d, n in enumerate(x.shape) if n == 1]
        if len(args) > 1:
            want = args[1] if isinstance(args[1], (tuple, list)) else [args[1]]
            dims = [d % x.dim() for d in want if x.shape[d % x.dim()] == 1]
        if fx.axis in dims:
            return unknown("squeeze of the batch")
        return replace(fx, axis=fx.axis - sum(d < fx.axis for d in dims))
    pos = 2 if name == "take_along_dim" else 1
    dim = args[pos] if len(args) > pos else kwargs.get("dim")
    if not isinstance(dim, int) or dim % x.dim() == fx.axis:
        return unknown(f"{name} along the batch")
    if name == "select" and dim % x.dim() < fx.axis:
        return replace(fx, axis=fx.axis - 1)
    index = (args[1] if name == "take_along_dim" else args[2]) if len(args) > pos else kwargs.get(
        "index", kwargs.get("indices"))
    if name in {"gather", "take_along_dim"} and isinstance(index, Traced) and (
            index.sdp_form.kind != "rows" or index.sdp_form.axis != fx.axis):
        return unknown(f"{name} with an index whose batch is on another axis")
    return fx


def _item(fx: Form, x: Tensor, index: Any) -> Form:
    """``x[index]``: the batch kept whole when only full slices, ``None`` and ``...`` precede it."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Tensor) or isinstance(i, (list, range)) for i in idx):
        return unknown("indexing with a tensor (a selection of the batch)")
    if Ellipsis in idx:
        pos = idx.index(Ellipsis)
        lead, tail = idx[:pos], idx[pos + 1:]
        consumed = sum(1 for i in tail if i is not None)
        if all(i == _FULL for i in lead) and x.dim() - consumed > fx.axis:
            return fx  # everything after `...` acts on dimensions after the batch
        return unknown("indexing the batch")
    axis, seen = fx.axis, 0
    new_axis = 0
    for i in idx:
        if seen == axis:
            if i is None:
                new_axis += 1
                continue
            if i != _FULL:
                return unknown("indexing the batch")
            return replace(fx, axis=new_axis)
        if i is None:
            new_axis += 1
            continue
        if isinstance(i, int):
            seen += 1
            continue
        if not isinstance(i, slice):
            return unknown("indexing")
        seen += 1
        new_axis += 1
    return replace(fx, axis=new_axis + (axis - seen))

