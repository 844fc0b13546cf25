"""Walking and rebuilding the nested arguments of a torch call (lists, tuples, dicts).

The tracer's one argument walk (:meth:`Tracer.scan`) finds parameters and the
batch; these helpers flatten arguments the same way, rebuild them with some
tensors replaced, and classify a call (in place, a slice of a parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

SETITEM = {"__setitem__", "index_put", "masked_scatter", "scatter"}


def mutates(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` writes into one of its arguments (in-place op or ``out=``)."""
    name = getattr(func, "__name__", "")
    if "out" in kwargs and kwargs["out"] is not None:
        return True
    if name.startswith("__"):
        return name in SETITEM or (name.startswith("__i") and name not in ("__index__", "__int__",
                                                                            "__invert__", "__iter__"))
    return name.endswith("_")


def slice_region(index: Any, shape: torch.Size) -> tuple[slice, ...] | None:
    """Normalised region of a basic, step-1 slicing index, or ``None`` for anything else."""
    idx = index if isinstance(index, tuple) else (index,)
    if not idx or len(idx) > len(shape) or not all(isinstance(i, slice) for i in idx):
        return None
    out = []
    for s, n in zip(idx, shape, strict=False):
        start, stop, step = s.indices(n)
        if step != 1 or isinstance(s.start, Tensor) or isinstance(s.stop, Tensor):
            return None
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def flat(xs: Any) -> list[Any]:
    """Every leaf of nested lists, tuples and dicts (the same walk as ``find_params``)."""
    out: list[Any] = []
    _flat_into(xs, out)
    return out


def _flat_into(x: Any, out: list[Any]) -> None:
    # A module-level recursion: a nested function calling itself is a reference
    # cycle (function -> closure cell -> function) that keeps `out`, and every
    # tensor in it, alive until the cyclic gc runs.
    if isinstance(x, (list, tuple)):
        for y in x:
            _flat_into(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _flat_into(y, out)
    else:
        out.append(x)


def rebuild(x: Any, f: Callable[[Tensor], Tensor | None]) -> Any:
    """``x`` with every tensor ``t`` for which ``f(t)`` is not ``None`` replaced (any nesting)."""
    if isinstance(x, Tensor):
        r = f(x)
        return x if r is None else r
    if isinstance(x, (list, tuple)):
        items = [rebuild(y, f) for y in x]
        if all(a is b for a, b in zip(items, x, strict=True)):
            return x
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
            return type(x)(*items)
        return type(x)(items)
    if isinstance(x, dict):
        d = {k: rebuild(v, f) for k, v in x.items()}
        if all(d[k] is x[k] for k in x):
            return x
        return type(x)(d) if type(x) is not dict else d
    return x


def detach_in(x: Any, tensors: Sequence[Tensor]) -> Any:
    """``x`` (arguments: a tuple or a dict) with each of ``tensors`` detached, at any depth."""
    ids = {id(t) for t in tensors}
    return rebuild(x, lambda t: t.detach() if id(t) in ids else None)


def replace_in(x: Any, subs: dict[int, tuple[Tensor, Tensor, Any]]) -> Any:
    """``x`` with each tensor whose id is in ``subs`` replaced by ``subs[id][1]``, at any depth."""
    return rebuild(x, lambda t: subs[id(t)][1] if id(t) in subs else None)
