"""How the uses of a parameter combine: per-example norm bounds and clipped sums.

A parameter used several times (tied embeddings, a module called twice, a
recurrent weight) has several :class:`~swiftdp.clipping.contributions.Contribution`
objects; its per-example gradient is their sum, so its squared norm has cross
terms, computed by :func:`pair_inner_bound` (ghost style when both sides allow it).

Rounding cannot make an example look small. :func:`param_sq_norms` returns,
per example, the square of an *upper bound* on the norm of what
:func:`param_weighted_sum` adds for that example divided by its weight:

* a sum of squares (instantiated gradients, embedding rows) has no
  cancellation; it is accumulated in float64;
* a ghost norm ``⟨a aᵀ, g gᵀ⟩`` sums terms of both signs (a crafted input
  makes float32 cancel it to zero): a bound on the rounding of the Gram
  matrices and of the sum, read off the same matrices at the cost of a few
  passes over them, is added (:func:`~swiftdp.clipping.rounding.ghost_sq_bound`);
* a ghost clipped sum ``(w ⊙ g)ᵀ a`` rounds every term ``w g_t a_tᵀ`` on its
  own, whatever the exact sum is, so ``θ · Σ_t ‖a_t‖‖g_t‖`` is added to the
  norm (the use's ``slack``), ``θ`` the rounding of one term;
* cross terms between uses are computed in float64 with a worst-case bound.

An example whose weight is zero (its norm was not finite) is dropped exactly:
its factors are masked with ``torch.where`` (``0 · inf`` is NaN), so the
others' clipped sum is unchanged.

Everything here reads the contributions through their methods only (this
module imports no contribution class), and is re-exported by
:mod:`swiftdp.clipping.contributions`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from swiftdp.clipping.rounding import (
    F64,
    U64,
    compute_dtype,
    device_constant,
    gamma,
    max_finite,
    unit_roundoff,
)

if TYPE_CHECKING:
    from swiftdp.clipping.contributions import Contribution

_FEW = 4  # up to this many parameters, bounds are formed one by one (stacking costs more)

SlackParts = tuple[float, Tensor | None]
"""``(θ, base)`` with ``slack = θ · base``; ``base`` ``None`` stands for ``√sq_norms()``."""


def rows(t: Tensor) -> Tensor:
    """``(B, n)`` view of a per-example tensor, safe for ``B = 0``."""
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)


# ------------------------------------------------------------------- slack
def slack_from_parts(c: Contribution) -> Tensor:
    """``θ · base`` from ``c.slack_parts()``: the ``slack`` of the classes that define the parts.

    A class sets ``slack = slack_from_parts``; its slack is then ``θ · base``
    by construction, and the bounds below use the parts without forming it.
    """
    parts = c.slack_parts()
    assert parts is not None
    theta, base = parts
    return theta * (c.sq_norms().sqrt() if base is None else base)


def _parts(c: Contribution) -> SlackParts | None:
    """``c``'s slack as ``(θ, base)`` when its class guarantees that form, else ``None``."""
    return c.slack_parts() if type(c).slack is slack_from_parts else None


@functools.cache
def _growth(uses: int, dtype: torch.dtype) -> float:
    """Growth of a parameter's norm bound: adding its uses up and the cast to its dtype
    (``γ_{uses+1}`` in the parameter's unit roundoff), and the few float64 roundings of
    the bound arithmetic itself (``γ_8``)."""
    return (1.0 + gamma(uses + 1, unit_roundoff(dtype))) * (1.0 + gamma(8, U64))


# ------------------------------------------------------------ cross terms
def _full(c: Contribution) -> Tensor:
    """Instantiate ``c`` in float64 into a ``(B, *param.shape)`` tensor (zeros outside its region)."""
    g = c.instantiate(F64)
    if c.region is None:
        return g
    out = g.new_zeros((g.shape[0], *c.param.shape))
    out[(slice(None), *c.region)] = g
    return out


def pair_inner_bound(x: Contribution, y: Contribution) -> tuple[Tensor, Tensor]:
    """Per-example inner product of two uses of the same parameter, and an error bound (float64)."""
    if x.region is not None and y.region is not None and x.region != y.region:
        if _disjoint(x.region, y.region):
            z = x.sq_norms().new_zeros(x.sq_norms().shape)
            return z, z
    if x.region == y.region:
        r = x.inner_bound(y)
        if r is None:
            r = y.inner_bound(x)
        if r is not None:
            return r
    fx, fy = rows(_full(x)), rows(_full(y))
    # instantiation in float64 (≤ terms roundings each) plus the dot product
    n = fx.shape[1] + x.terms + y.terms + 4
    return (fx * fy).sum(1), gamma(n, U64) * x.mass() * y.mass()


def pair_inner(x: Contribution, y: Contribution) -> Tensor:
    """Per-example inner product of two uses of the same parameter (float64)."""
    return pair_inner_bound(x, y)[0]


def _disjoint(r1: tuple[slice, ...], r2: tuple[slice, ...]) -> bool:
    for s1, s2 in zip(r1, r2, strict=False):
        a0, a1 = s1.start or 0, s1.stop
        b0, b1 = s2.start or 0, s2.stop
        if a1 is not None and a1 <= b0:
            return True
        if b1 is not None and b1 <= a0:
            return True
    return False


# ------------------------------------------------------------------ norms
def param_sq_norms(uses: list[Contribution]) -> Tensor:
    """Per example, the square of a bound on the norm of one parameter's clipped-sum term.

    ``(√(Σ_u ‖G^u‖² + 2 Σ_{u<v} ⟨G^u, G^v⟩) + Σ_u slack_u)²`` with every piece
    an upper bound, grown by the rounding of adding the uses up and of the
    cast to the parameter's dtype (and of this float64 arithmetic). Summed
    over parameters and square-rooted, it bounds the norm of everything added
    for the example divided by its weight (Minkowski), so clipping with it
    keeps each example within ``C``. A bound beyond the largest finite
    float32 (float64 for float64 models) is reported as ``inf``: the
    example's gradient is not representable and is dropped (see
    :func:`~swiftdp.clipping.clip_fns.clip_factors`).

    Returns:
        float64 ``(B,)``; NaN or inf for examples whose gradient is not finite.
    """
    param = uses[0].param
    grow = _growth(len(uses), param.dtype)
    parts = _parts(uses[0]) if len(uses) == 1 else None
    if parts is not None:  # one use, slack θ · base: no slack tensor formed
        theta, base = parts
        # sq_norms of these classes are sums of squares or clamped bounds (>= 0 or NaN)
        root = uses[0].sq_norms().sqrt()
        bound = root.mul_((1.0 + theta) * grow) if base is None else (
            root.add_(base, alpha=theta).mul_(grow))
    else:
        total = uses[0].sq_norms()
        slack = uses[0].slack()
        for k in range(1, len(uses)):
            total = total + uses[k].sq_norms()
            slack = slack + uses[k].slack()
            for j in range(k):
                v, e = pair_inner_bound(uses[j], uses[k])
                total = total + 2.0 * (v + e)
        bound = total.clamp(min=0).sqrt_().add_(slack).mul_(grow)
    bound = torch.where(bound <= max_finite(compute_dtype(param)), bound, math.inf)
    return bound.square_()


def total_sq_norms(groups: Iterable[list[Contribution]]) -> Tensor | None:
    """``Σ_p param_sq_norms(uses_p)`` over the parameters, in a few tensor operations for all.

    Each parameter's bound is the one :func:`param_sq_norms` forms; those of
    the single-use parameters whose slack is ``θ · base`` (nearly all) are
    formed together, stacked in one ``(P, B)`` tensor (when there are more
    than a few: 26 parameters measured 3.5 times faster than one call each,
    4 the same). The float64 sum over the parameters is grown by its own
    rounding.

    Args:
        groups: the uses of each parameter (one list per parameter).

    Returns:
        float64 ``(B,)``, or ``None`` when there is no parameter.
    """
    rest: Tensor | None = None
    based: list[tuple[Tensor, Tensor, float, float]] = []
    plain: list[tuple[Tensor, float]] = []
    big: float | None = None
    n = 0
    for uses in groups:
        n += 1
        c = uses[0]
        parts = _parts(c) if len(uses) == 1 else None
        b = max_finite(compute_dtype(c.param))
        if parts is None or (big is not None and b != big):
            s = param_sq_norms(uses)
            rest = s if rest is None else rest + s
            continue
        big = b
        theta, base = parts
        grow = _growth(1, c.param.dtype)
        if base is None:
            plain.append((c.sq_norms(), (1.0 + theta) * grow))
        else:
            based.append((c.sq_norms(), base, theta, grow))
    if big is None:
        return rest
    if len(based) + len(plain) <= _FEW:
        sq = [t[0].sqrt().add_(t[1], alpha=t[2]).mul_(t[3]) for t in based]
        sq += [t[0].sqrt().mul_(t[1]) for t in plain]
        for r in sq:
            r = torch.where(r <= big, r, math.inf).square_()
            rest = r if rest is None else rest + r
        assert rest is not None
        return rest.mul_(1.0 + gamma(n + 1, U64))
    roots = torch.stack([t[0] for t in based] + [t[0] for t in plain]).sqrt_()
    dev = roots.device
    if based:
        thetas = device_constant(tuple(t[2] for t in based), dev).unsqueeze(1)
        roots[: len(based)].addcmul_(torch.stack([t[1] for t in based]), thetas)
    factors = [t[3] for t in based] + [t[1] for t in plain]
    roots.mul_(device_constant(tuple(factors), dev).unsqueeze(1))
    total = torch.where(roots <= big, roots, math.inf).square_().sum(0)
    if rest is not None:
        total = total + rest
    return total.mul_(1.0 + gamma(n + 1, U64))


# ------------------------------------------------------------- clipped sums
def dropped_examples(weights: Tensor) -> Tensor | None:
    """Mask of the examples whose weight is not positive (dropped), or ``None`` if there are none.

    One host synchronisation (``.any()``).
    """
    bad = ~(weights > 0)
    return bad if bool(bad.any()) else None


def param_weighted_sum(
    param: Tensor,
    uses: list[Contribution],
    weights: Tensor,
    dropped: Tensor | None = None,
    *,
    detect: bool = True,
) -> Tensor:
    """``Σ_i w_i G_i`` for one parameter, summed over its uses, dropped examples left out exactly.

    Args:
        param: the parameter.
        uses: its contributions.
        weights: ``(B,)`` per-example weights (clip factor times loss scale).
        dropped: ``(B,)`` bool mask of examples to leave out (their factors
            may hold NaN or inf; ``0 · inf`` would be NaN), or ``None``.
        detect: also drop the examples whose weight is zero or NaN (one host
            synchronisation per call). A caller that already knows the mask
            (one check per step) passes it with ``detect=False``.

    Returns:
        The clipped sum, shaped like ``param``, in at least float32.
    """
    if dropped is None and detect:
        dropped = dropped_examples(weights)
    # Kept in at least float32: a low-precision parameter dtype is applied only
    # after the noise (rounding before it would depend on every example).
    acc = compute_dtype(param)
    if len(uses) == 1 and uses[0].region is None:
        s = uses[0].weighted_sum(weights, dropped).reshape(param.shape)
        return s.to(compute_dtype(s, param))
    out = torch.zeros(param.shape, dtype=acc, device=param.device)
    for c in uses:
        s = c.weighted_sum(weights, dropped).to(out.dtype)
        if c.region is None:
            out += s.reshape(param.shape)
        else:
            out[c.region] += s.reshape(out[c.region].shape)
    return out
