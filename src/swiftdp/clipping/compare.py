"""Comparing the probe's outputs: equal except along one example, within a float tolerance."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

REL_TOL = 1e-5
"""Largest change of another example's output, relative to the output's scale, still called equal."""

_BLOCK = 1 << 20  # elements per block of the output comparison


def tree_unchanged(a: Any, b: Any, j: int, batch: int) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(unchanged(x, y, j, batch) for x, y in zip(la, lb, strict=True))


def unchanged(a: Any, b: Any, j: int | None, batch: int) -> bool:
    """Whether leaf ``b`` equals ``a`` except along example ``j`` (``None``: everywhere).

    A tensor passes if some dimension of size ``batch`` has all slices but
    ``j`` equal, or if it has no such dimension and is equal as a whole.
    """
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        return False
    if not isinstance(a, Tensor):
        if isinstance(a, (bool, int, float, complex, str)) or a is None:
            return bool(a == b or (a != a and b != b))  # NaN equals NaN here
        return True  # an opaque object: nothing to compare
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    axes = [] if j is None else [d for d in range(a.dim()) if a.shape[d] == batch]
    if not axes:
        return _close(a, b)
    if batch == 1:
        return True  # no other example to compare
    return any(_close_except(a, b, d, j) for d in axes)


def _close_except(a: Tensor, b: Tensor, d: int, j: int | None) -> bool:
    """:func:`_close` on every slice of ``a`` and ``b`` along ``d`` but ``j``, block by block.

    Views of blocks of slices (no copy of the other examples' outputs, small
    temporaries); the verdict is the whole tensors': all blocks equal, or the
    largest difference within the tolerance of the largest finite value.
    """
    n = a.shape[d]
    step = max(1, _BLOCK // max(1, a.numel() // max(n, 1)))
    spans = [(s, min(e, s + step)) for s0, e in ((0, j if j is not None else n), (
        (j + 1) if j is not None else n, n)) for s in range(s0, e, step)]
    if not (a.is_floating_point() or a.is_complex()):
        return all(torch.equal(a.narrow(d, s, e - s), b.narrow(d, s, e - s)) for s, e in spans)
    tol = max(REL_TOL, 8 * torch.finfo(a.dtype).eps)
    same_all, worst, scale = True, 0.0, 0.0
    for s, e in spans:
        x, y = a.narrow(d, s, e - s), b.narrow(d, s, e - s)
        if x.dtype in (torch.float16, torch.bfloat16):
            x, y = x.float(), y.float()
        same = (x == y) | (x.isnan() & y.isnan())
        scale = max(scale, _finite_max(x), _finite_max(y))
        if bool(same.all()):
            continue
        same_all = False
        diff = (x - y).abs().masked_fill(same, 0).nan_to_num(nan=float("inf"))
        worst = max(worst, float(diff.max()))
    return same_all or worst <= tol * scale


def _close(a: Tensor, b: Tensor) -> bool:
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    tol = max(REL_TOL, 8 * torch.finfo(a.dtype).eps)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    same = (a == b) | (a.isnan() & b.isnan())
    if bool(same.all()):
        return True
    diff = (a - b).abs().masked_fill(same, 0).nan_to_num(nan=float("inf"))
    scale = max(_finite_max(a), _finite_max(b))
    return bool(diff.max() <= tol * scale)


def _finite_max(t: Tensor) -> float:
    v = t.abs()[torch.isfinite(t)]
    return float(v.max()) if v.numel() else 0.0


# ---------------------------------------------------------------- diagnosis
