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

from typing import Any

from torch import Tensor

ATTR = "_swiftdp_batch"


def mark(t: Tensor, token: object, dim: int | None, virtual: bool = False) -> None:
    """Record that ``t`` carries the batch along ``dim`` (``None``: unknown).

    ``virtual``: the batch dimension was made by broadcasting a parameter to
    the batch size (``cls.expand(B, ...)``), not by the data; it is per-example
    only as long as each row meets its own example (see :func:`check_virtual`).
    """
    try:
        setattr(t, ATTR, (token, dim, virtual))
    except (AttributeError, RuntimeError):  # tensors that take no attributes
        pass


def read(t: Any, token: object) -> tuple[bool, int | None]:
    """``(carries, dim)`` of ``t`` for this forward's ``token``."""
    m = getattr(t, ATTR, None)
    if m is None or m[0] is not token:
        return False, None
    return True, m[1]


def is_virtual(t: Any, token: object) -> bool:
    """Whether ``t``'s batch dimension comes only from a parameter broadcast to the batch."""
    m = getattr(t, ATTR, None)
    return m is not None and m[0] is token and m[2]


def check_virtual(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  operands: list[tuple[Tensor, int | None, bool]], outs: list[Tensor]) -> bool:
    """For an op with an operand whose batch is virtual: the rows must stay aligned.

    Every batched operand's batch must land on one and the same known output
    dimension; otherwise the broadcast parameter's rows would be credited to
    examples they do not belong to (a reduction over them, a transpose
    against the data's batch).

    Returns:
        Whether the output's batch is virtual too (no operand carries real data).

    Raises:
        UnsupportedModuleError: the rows do not stay aligned.
    """
    from swiftdp.errors import UnsupportedModuleError

    name = getattr(func, "__name__", "") or repr(func)
    for x, d, virtual in operands:
        if virtual and _touches_batch(name, args, kwargs, x, d):
            raise UnsupportedModuleError(
                f"`{name}` acts along the batch dimension of a value broadcast to the batch "
                "(a parameter expanded to it, or a lookup with indices shared by the batch): "
                "its rows are alike, so the op may move or mix them across examples without "
                "changing the forward, and each example's gradient could no longer be told "
                "apart. Apply the op before broadcasting, or along another dimension."
            )
    for o in outs:
        dims = {out_dim(func, args, kwargs, x, d, o) for x, d, _ in operands}
        if len(dims) != 1 or None in dims:
            raise UnsupportedModuleError(
                f"`{getattr(func, '__name__', func)}` combines a parameter broadcast to the "
                "batch (e.g. `p.expand(B, ...)`) in a way that does not keep one row per "
                "example (it reduces over the batch or moves it against the data's batch), "
                "so swiftdp cannot credit the parameter's gradient to examples. Use the "
                "parameter without expanding it to the batch."
            )
    return all(v for _, _, v in operands)


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
    if name in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm"):
        first = args and args[0] is x
        return (not first) or d >= n - 1 or (n == 2 and d == 0 and not first)
    if name in ("__getitem__", "__setitem__"):
        idx = rest[0] if rest else None
        items = idx if isinstance(idx, tuple) else (idx,)
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
    if name in ("unsqueeze", "unsqueeze_"):
        k = _norm(rest[0] if rest else kwargs.get("dim"), n + 1)
        return d + 1 if k is not None and k <= d else d
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
