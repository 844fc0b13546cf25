"""Where the batch is: tracked from the model's inputs through every op.

Each tensor derived from the model's batched inputs during a forward carries a
mark ``(token, dim)``: the forward's token and the dimension that indexes the
examples (``None`` when an op made it unknown, e.g. a reshape that merged the
batch with another dimension). Marks are propagated by the dispatcher for
every torch function, with the dimension followed through the ops that move
it (transpose, permute, movedim, unsqueeze, squeeze, ``.T``/``.mT``) and by
alignment for the rest; nothing is guessed from a size alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ATTR = "_swiftdp_batch"

# How a tensor's batch rows came to be (the mark's third field).
REAL = 0  # from the data alone
TAINTED = 1  # from the data and from rows broadcast to the batch (credited by row)
VIRTUAL = 2  # from rows broadcast to the batch alone (a parameter expanded to it)


def mark(t: Tensor, token: object, dim: int | None, kind: int = REAL, per: int = 1) -> None:
    """Record that ``t`` carries the batch along ``dim`` (``None``: unknown).

    ``kind``: ``VIRTUAL`` when the batch dimension was made by broadcasting a
    parameter to the batch size (``cls.expand(B, ...)``), not by the data; it
    is per-example only as long as each row meets its own example (see
    :func:`check_virtual`). ``TAINTED`` when such rows were combined with the
    data's: each row's gradient is credited to its example, so the rows must
    not move against the rest of the batch later either.

    ``per``: the batch is merged into ``dim`` with ``per`` consecutive entries
    per example, examples outermost (OPT's ``hidden.reshape(-1, d)``, of size
    ``B * T``); :func:`read` reports its dimension as unknown, and
    :func:`merged` tells it.
    """
    try:
        setattr(t, ATTR, (token, dim, kind, per))
    except (AttributeError, RuntimeError):  # tensors that take no attributes
        pass


def read(t: Any, token: object) -> tuple[bool, int | None]:
    """``(carries, dim)`` of ``t`` for this forward's ``token``."""
    m = getattr(t, ATTR, None)
    if m is None or m[0] is not token:
        return False, None
    return True, (m[1] if m[3] == 1 else None)


def merged(t: Any, token: object) -> tuple[int, int] | None:
    """``(dim, per)`` when ``t``'s batch is merged into ``dim``, ``per`` entries per example."""
    m = getattr(t, ATTR, None)
    if m is None or m[0] is not token or m[3] == 1 or m[1] is None:
        return None
    return m[1], m[3]


BROADCASTING = frozenset({
    "add", "sub", "mul", "div", "true_divide", "where", "maximum", "minimum", "masked_fill",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__pow__", "__rpow__", "pow", "addcmul", "addcdiv", "lerp", "atan2",
    "matmul", "__matmul__", "__rmatmul__", "expand", "expand_as", "broadcast_to", "eq", "ne",
    "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__and__", "__or__", "__xor__", "logical_and", "logical_or", "copysign", "fmod",
    "remainder", "__mod__", "hypot", "__floordiv__", "floor_divide",
})
RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})


def reshaped(x: Tensor, d: int, per: int, out: Tensor, batch: int) -> tuple[int | None, int]:
    """``(dim, per)`` of the batch in ``out``, a reshape of ``x`` (batch at ``d``, ``per``).

    A reshape keeps the elements' order: with the dimensions before ``d``
    unchanged, example ``b`` holds a contiguous run of ``N = per * prod(x.shape
    [d+1:])`` entries of each sub-block, so ``out``'s dimension ``d`` still
    indexes examples (``N / prod(out.shape[d+1:])`` entries each) when that
    divides; otherwise an entry of ``out`` mixes examples and the batch is lost.
    """
    if out.dim() <= d or tuple(out.shape[:d]) != tuple(x.shape[:d]):
        return None, 1
    n_in = per * math.prod(x.shape[d + 1:])
    n_out = math.prod(out.shape[d + 1:])
    if n_out == 0 or n_in % n_out or out.shape[d] != batch * (n_in // n_out):
        return None, 1
    return d, n_in // n_out


def is_virtual(t: Any, token: object) -> bool:
    """Whether ``t``'s batch dimension comes only from a parameter broadcast to the batch."""
    m = getattr(t, ATTR, None)
    return m is not None and m[0] is token and m[2] == VIRTUAL


def check_virtual(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  operands: list[tuple[Tensor, int | None, int, int]], outs: list[Tensor],
                  batch: int) -> int:
    """For an op with an operand whose batch is virtual or tainted: the rows must stay aligned.

    No op may move or mix the rows of such an operand along its batch (a
    flip, a sort, a permutation by indexing; one that keeps them, such as
    indexing with ``arange(B)``, passes). Every batched operand's batch must
    also land on one and the same known output dimension (a reshape may merge
    it into the rows, examples outermost); otherwise the broadcast rows would
    be credited to examples they do not belong to (a reduction over them,
    ``unbind``/``split``/``repeat`` along the batch, a transpose against the
    data's batch, a flatten with the examples innermost). Tainted operands
    are held to the same rules: the rows credited to an example must stay
    with it even after they met the data (``bias + zeros_like(x)`` holds no
    data the independence probe could see move).

    Returns:
        The output's kind: ``VIRTUAL`` when no operand carries real data, else
        ``TAINTED``.

    Raises:
        UnsupportedModuleError: the rows do not stay aligned.
    """
    from swiftdp.errors import UnsupportedModuleError

    name = getattr(func, "__name__", "") or repr(func)
    for x, d, kind, _ in operands:
        if kind != REAL and _touches_batch(name, args, kwargs, x, d):
            raise UnsupportedModuleError(
                f"`{name}` acts along the batch dimension of a value broadcast to the batch "
                "(a parameter expanded to it, or a lookup with indices shared by the batch): "
                "its rows are alike, so the op may move or mix them across examples without "
                "changing the forward, and each example's gradient could no longer be told "
                "apart. Apply the op before broadcasting, or along another dimension."
            )
    for o in outs:
        dims = {reshaped(x, d, per, o, batch)[0] if name in RESHAPES and d is not None
                else out_dim(func, args, kwargs, x, d, o) for x, d, _, per in operands}
        if len(dims) != 1 or None in dims:
            raise UnsupportedModuleError(
                f"`{getattr(func, '__name__', func)}` combines a parameter broadcast to the "
                "batch (e.g. `p.expand(B, ...)`) in a way that does not keep one row per "
                "example (it reduces over the batch or moves it against the data's batch), "
                "so swiftdp cannot credit the parameter's gradient to examples. Use the "
                "parameter without expanding it to the batch."
            )
    return VIRTUAL if all(k == VIRTUAL for _, _, k, _ in operands) else TAINTED


# ops that read or reorder along a dimension argument (``dim``, ``dims``)
_ALONG = frozenset({
    "flip", "roll", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "softmax",
    "log_softmax", "_softmax", "_log_softmax", "normalize", "sort", "argsort", "topk", "gather",
    "index_select", "take_along_dim", "scatter", "scatter_add", "scatter_reduce", "index_add",
    "index_copy", "index_fill", "index_put", "narrow", "select", "diff", "renorm", "msort",
    "kthvalue", "median", "nanmedian", "mode", "unique_consecutive", "rot90", "fliplr", "flipud",
})
# ops that mix entries along dimensions they do not take as an argument
_MIXING = frozenset({
    "einsum", "batch_norm", "instance_norm", "apply", "take", "put", "masked_scatter",
    "masked_select", "nonzero", "unique", "histc", "bincount", "cdist", "pdist", "trace",
    "tensordot", "kron", "outer", "inner", "dot", "vdot", "cross",
})


def _touches_batch(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor,
                   d: int | None) -> bool:
    """Whether ``name(*args)`` may move or mix the entries of ``x`` along dimension ``d``."""
    if d is None:
        return True
    n = x.dim()
    if name in _MIXING:
        return True
    rest = args[1:] if args and args[0] is x else args
    if name in _ALONG:
        if name in ("fliplr", "rot90"):
            return d in (0, 1)
        if name == "flipud":
            return d == 0
        dim = kwargs.get("dims", kwargs.get("dim"))
        if dim is None:
            pos = 1 if name == "roll" else 0
            dim = rest[pos] if len(rest) > pos else None
        if name == "normalize" and dim is None:
            dim = 1
        if name in ("sort", "argsort", "topk", "kthvalue", "median", "mode") and dim is None:
            dim = -1
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if any(not isinstance(k, int) for k in dims):
            return True  # a flattened roll, an unknown dimension: assume it does
        return d in [_norm(k, n) for k in dims]
    if name in ("matmul", "__matmul__", "__rmatmul__", "bmm") and n >= 3 and d < n - 2:
        return False  # a batch dimension of the product: each row meets its own
    if name in ("addmm", "baddbmm"):  # (input, mat1, mat2): input is added to the product
        if args and args[0] is x:
            return d != 0
        first = len(args) > 1 and args[1] is x
        return (not first) or d >= n - 1 or (name == "baddbmm" and d != 0)
    if name in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm"):
        lead = bool(args) and args[0] is x
        return (not lead) or d >= n - 1
    if name in ("__getitem__", "__setitem__"):
        idx = rest[0] if rest else None
        items = idx if isinstance(idx, tuple) else (idx,)
        if d == 0 and _rows_in_order(items, x.shape[0]):
            return False  # x[arange(B), lengths]: one entry of each row, in order
        if any(isinstance(i, (Tensor, list)) for i in items):
            return True  # a selection or permutation of rows
        pos = 0
        for i in items:
            if i is Ellipsis:
                return False if pos > d else not all(
                    j == slice(None) for j in items[:items.index(Ellipsis)])
            if i is None:
                continue
            if pos == d:
                return i != slice(None)
            pos += 1
        return False
    return False


def _rows_in_order(items: tuple[Any, ...], rows: int) -> bool:
    """Whether an index ``(arange(rows), t1, ...)`` takes one entry of each row, in order."""
    first = items[0] if items else None
    if not (isinstance(first, Tensor) and first.dim() == 1 and first.numel() == rows
            and not first.is_floating_point() and first.dtype != torch.bool):
        return False
    rest = [i for i in items[1:] if isinstance(i, Tensor)]
    if any(i.dim() > 1 or (i.dim() == 1 and i.numel() != rows) for i in rest):
        return False
    if any(not (isinstance(i, Tensor) or i == slice(None) or i is Ellipsis) for i in items[1:]):
        return False
    return bool(torch.equal(first.cpu(), torch.arange(rows)))


def _norm(d: Any, n: int) -> int | None:
    return int(d) + n if isinstance(d, int) and d < 0 else (int(d) if isinstance(d, int) else None)


def out_dim(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor,
            d: int | None, out: Tensor) -> int | None:
    """The batch dimension of ``out``, computed from input ``x``'s (``d``) through ``func``."""
    if d is None or out.dim() == 0:
        return None
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    n = x.dim()
    rest = args[1:] if args and args[0] is x else args
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a = _norm(rest[0] if rest else kwargs.get("dim0"), n)
        b = _norm(rest[1] if len(rest) > 1 else kwargs.get("dim1"), n)
        return b if d == a else a if d == b else d
    if name in ("t", "t_") or (name == "T" and n == 2):
        return 1 - d if n == 2 else d
    if name == "T":
        return n - 1 - d
    if name == "mT":
        return n - 1 if d == n - 2 else n - 2 if d == n - 1 else d
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = [_norm(k, n) for k in dims]
        return dims.index(d) if d in dims else None
    if name in ("movedim", "moveaxis"):
        src, dst = (rest[0], rest[1]) if len(rest) > 1 else (kwargs.get("source"), kwargs.get("destination"))
        srcs = [_norm(k, n) for k in (src if isinstance(src, (list, tuple)) else [src])]
        dsts = [_norm(k, n) for k in (dst if isinstance(dst, (list, tuple)) else [dst])]
        order = [k for k in range(n) if k not in srcs]
        placed: list[int | None] = [None] * n
        for s_, t_ in zip(srcs, dsts, strict=False):
            if t_ is not None and 0 <= t_ < n:
                placed[t_] = s_
        it = iter(order)
        final = [p if p is not None else next(it) for p in placed]
        return final.index(d) if d in final else None
    if name in ("unbind", "select"):  # dimension k removed: never matched by sizes
        k = _norm(rest[0] if rest else kwargs.get("dim", 0), n)
        return None if k is None or k == d else (d - 1 if k < d else d)
    if name in ("unsqueeze", "unsqueeze_"):
        k = _norm(rest[0] if rest else kwargs.get("dim"), n + 1)
        return d + 1 if k is not None and k <= d else d
    # A broadcasting op that adds dimensions aligns its operands from the
    # right: ``(B, 1) + (B, 1, 1)`` puts the first operand's batch at 1.
    if name in BROADCASTING and out.dim() > n:
        r = d + out.dim() - n
        return r if out.shape[r] == x.shape[d] else None
    # Everything else: the batch keeps its place when the leading dimensions
    # up to it are unchanged (elementwise ops, matmuls, reshapes of the tail),
    # or its place from the right when shapes broadcast.
    if out.dim() > d and out.shape[: d + 1] == x.shape[: d + 1]:
        return d
    r = d + out.dim() - n
    if 0 <= r < out.dim() and out.shape[r:] == x.shape[d:] and r != d:
        return r
    if name in ("squeeze", "squeeze_") and out.dim() < n:
        kept = [k for k in range(n) if not (x.shape[k] == 1 and k != d)]
        return kept.index(d) if out.dim() == len(kept) else None
    return None
