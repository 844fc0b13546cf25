"""Per-example gradient contributions and how they combine.

A layer rule turns the activations and output gradients of one *use* of a
parameter into a :class:`Contribution`: something that can report each
example's squared gradient norm, the clipped (weighted) sum ``Σ_i w_i G_i``
and, when needed, the instantiated per-example gradients ``G_i``.

A parameter used several times (tied embeddings, a module called twice, a
recurrent weight) gets several contributions; its per-example gradient is
their sum, so its squared norm has cross terms, computed by
:func:`pair_inner_bound` (ghost style when both sides allow it).

Rounding cannot make an example look small. :func:`param_sq_norms` returns,
per example, the square of an *upper bound* on the norm of what
:func:`param_weighted_sum` adds for that example divided by its weight:

* a sum of squares (instantiated gradients, embedding rows) has no
  cancellation; it is accumulated in float64;
* a ghost norm ``⟨a aᵀ, g gᵀ⟩`` sums terms of both signs (a crafted input
  makes float32 cancel it to zero): a bound on the rounding of the Gram
  matrices and of the sum, read off the same matrices at the cost of a few
  passes over them, is added (:func:`ghost_sq_bound`);
* a ghost clipped sum ``(w ⊙ g)ᵀ a`` rounds every term ``w g_t a_tᵀ`` on its
  own, whatever the exact sum is, so ``θ · Σ_t ‖a_t‖‖g_t‖`` is added to the
  norm (:meth:`Contribution.slack`), ``θ`` the rounding of one term;
* cross terms between uses are computed in float64 with a worst-case bound.

The rounding model and the norm kernels (:func:`ghost_sq_bound`, float64
sums of squares formed block by block) are in :mod:`swiftdp.clipping.rounding`;
their names are re-exported here.

An example whose weight is zero (its norm was not finite) is dropped exactly:
its factors are masked with ``torch.where`` (``0 · inf`` is NaN), so the
others' clipped sum is unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from swiftdp.clipping.rounding import (
    F64,
    U64,
    compute_dtype,
    gamma,
    ghost_sq_bound,
    matmul_input_roundoff,
    max_finite,
    norms_f64,
    sq_norms_f64,
    term_error,
    unit_roundoff,
    weighted_sum_error,
)

__all__ = [
    "F64", "U64", "Contribution", "LinearFactors", "NormOnly", "PerSampleGrads", "Region",
    "SlackParts", "compute_dtype", "dropped_examples", "gamma", "ghost_sq_bound",
    "matmul_input_roundoff", "max_finite", "norms_f64", "pair_inner", "pair_inner_bound",
    "param_sq_norms", "param_weighted_sum", "slack_from_parts", "sq_norms_f64", "term_error",
    "total_sq_norms", "unit_roundoff", "weighted_sum_error",
]

Region = tuple[slice, ...] | None
SlackParts = tuple[float, Tensor | None]
"""``(θ, base)`` with ``slack = θ · base``; ``base`` ``None`` stands for ``√sq_norms()``."""


# ------------------------------------------------------------------ helpers
def _inst_sq(grads: Tensor) -> Tensor:
    """Per-example squared norms of instantiated ``(B, ...)`` gradients (float64, upper bound)."""
    sq, k = sq_norms_f64(_rows(grads))
    return sq.mul_(1.0 + gamma(k, U64))


def _inst_weighted_sum(grads: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
    """``Σ_i w_i G_i`` of instantiated ``(B, ...)`` gradients, flattened, dropped rows masked."""
    flat = _rows(grads)
    dt = compute_dtype(flat)
    f = flat.to(dt)
    if dropped is not None:
        f = torch.where(dropped.view(-1, 1), 0.0, f)
    return weights.to(dt) @ f


def _inst_slack(sq: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Slack of a clipped sum with one term per example (instantiated gradients)."""
    return weighted_sum_error(0, sq.shape[0], dtype, device) * sq.sqrt()


@functools.cache
def _growth(uses: int, dtype: torch.dtype) -> float:
    """Growth of a parameter's norm bound: adding its uses up and the cast to its dtype
    (``γ_{uses+1}`` in the parameter's unit roundoff), and the few float64 roundings of
    the bound arithmetic itself (``γ_8``)."""
    return (1.0 + gamma(uses + 1, unit_roundoff(dtype))) * (1.0 + gamma(8, U64))


def _dot_rows(x: Tensor, y: Tensor, mx: Tensor, my: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example ``⟨x_i, y_i⟩`` of ``(B, n)`` rows in float64, and its error bound."""
    v = (x.to(F64) * y.to(F64)).sum(1)
    return v, gamma(x.shape[1] + 4, U64) * mx * my


# ------------------------------------------------------------------ contributions
class Contribution:
    """One use of one parameter, for every example of the batch.

    Attributes:
        param: the parameter this use contributes to.
        region: the part of ``param`` covered (``None``: all of it). Two
            contributions with different, non-``None`` regions are disjoint.
        terms: per example, how many terms each entry of the instantiated
            gradient sums (``T`` for factored uses, 1 when exact).
    """

    param: Tensor
    region: Region = None
    terms: int = 1

    def sq_norms(self) -> Tensor:
        """Upper bounds on the per-example squared Frobenius norms, float64, shape ``(B,)``."""
        raise NotImplementedError

    def slack(self) -> Tensor:
        """Per example, a bound on ``‖(what weighted_sum adds)/w_i − G_i‖`` (float64, ``(B,)``).

        The default covers a sum over the batch with one term per example,
        computed in the parameter's compute dtype.
        """
        return _inst_slack(self.sq_norms(), compute_dtype(self.param), self.param.device)

    def slack_parts(self) -> SlackParts | None:
        """``(θ, base)`` with ``slack() == θ · base`` (``base`` ``None``: ``√sq_norms()``), or ``None``.

        Read only for a class whose ``slack`` *is* :func:`slack_from_parts`
        (so the two cannot disagree): the bounds then skip forming the slack.
        """
        return None

    def mass(self) -> Tensor:
        """Per example, an upper bound on the sum of the norms of the terms of ``G_i``.

        It bounds ``‖G_i‖`` and the rounding of any inner product with ``G_i``.
        """
        return self.sq_norms().sqrt()

    def weighted_sum(self, weights: Tensor, dropped: Tensor | None = None) -> Tensor:
        """``Σ_i weights_i G_i`` over the examples not ``dropped``, shaped like the region.

        Args:
            weights: ``(B,)`` per-example weights.
            dropped: ``(B,)`` bool mask of examples left out exactly (their
                factors may hold NaN or inf), or ``None``.
        """
        raise NotImplementedError

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        """Per-example gradients ``G``, shape ``(B, *region_shape)``, in ``dtype`` if given."""
        raise NotImplementedError

    def inner_bound(self, other: Contribution) -> tuple[Tensor, Tensor] | None:
        """Per-example ``⟨G_i, H_i⟩`` with another use of the same region, and an error bound.

        Returns ``None`` when this class has no cheaper way than
        instantiating both sides.
        """
        return None

    def inner(self, other: Contribution) -> Tensor | None:
        """Per-example ``⟨G_i, H_i⟩`` (float64), or ``None`` (see :meth:`inner_bound`)."""
        r = self.inner_bound(other)
        return None if r is None else r[0]

    def region_shape(self) -> torch.Size:
        """Shape of the covered part of ``param``."""
        if self.region is None:
            return self.param.shape
        return self.param[self.region].shape


def slack_from_parts(c: Contribution) -> Tensor:
    """``θ · base`` from :meth:`Contribution.slack_parts`: ``slack`` of the classes that define them."""
    parts = c.slack_parts()
    assert parts is not None
    theta, base = parts
    return theta * (c.sq_norms().sqrt() if base is None else base)


def _parts(c: Contribution) -> SlackParts | None:
    """``c``'s slack as ``(θ, base)`` when its class guarantees that form, else ``None``."""
    t = type(c)
    return c.slack_parts() if t.slack is slack_from_parts or t is NormOnly else None


class PerSampleGrads(Contribution):
    """Instantiated per-example gradients ``(B, *shape)``."""

    def __init__(self, param: Tensor, grads: Tensor, region: Region = None) -> None:
        self.param = param
        self.grads = grads
        self.region = region
        self._sq: Tensor | None = None
        self._mass: Tensor | None = None

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            self._sq = _inst_sq(self.grads)
        return self._sq

    slack = slack_from_parts

    def slack_parts(self) -> SlackParts:
        g = self.grads
        return weighted_sum_error(0, g.shape[0], compute_dtype(g), g.device), None

    def mass(self) -> Tensor:
        if self._mass is None:
            self._mass = self.sq_norms().sqrt()
        return self._mass

    def weighted_sum(self, weights: Tensor, dropped: Tensor | None = None) -> Tensor:
        return _inst_weighted_sum(self.grads, weights, dropped).reshape(self.grads.shape[1:])

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.grads if dtype is None else self.grads.to(dtype)

    def inner_bound(self, other: Contribution) -> tuple[Tensor, Tensor] | None:
        if isinstance(other, PerSampleGrads):
            return _dot_rows(_rows(self.grads), _rows(other.grads), self.mass(), other.mass())
        return None


class NormOnly(Contribution):
    """The per-example squared norms and slack of a use, everything else freed (ghost pass 1)."""

    def __init__(self, source: Contribution) -> None:
        self.param = source.param
        self.region = source.region
        self._sq = source.sq_norms()
        self._parts = _parts(source)  # the slack's parts (the source's sq_norms are kept)
        self._slack = source.slack() if self._parts is None else None

    def sq_norms(self) -> Tensor:
        return self._sq

    def slack(self) -> Tensor:
        return slack_from_parts(self) if self._slack is None else self._slack

    def slack_parts(self) -> SlackParts | None:
        return self._parts


class LinearFactors(Contribution):
    """``G_i = g_iᵀ a_i`` kept factored: ``a`` is ``(B, T, d)``, ``g`` is ``(B, T, p)``.

    When ``ghost`` is false the per-example gradients are instantiated at once
    (``B × p × d``, in the compute dtype) and the factors dropped; the norms
    are then those of what is added. Otherwise norms come from the ghost
    identity ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩`` (bounded, see
    :func:`ghost_sq_bound`) and the clipped sum from ``(w ⊙ g)ᵀ a``.
    """

    def __init__(
        self, param: Tensor, a: Tensor, g: Tensor, *, ghost: bool, region: Region = None
    ) -> None:
        self.param = param
        self.region = region
        self.ghost = ghost
        self.terms = int(a.shape[1])
        self.a: Tensor | None = a
        self.g: Tensor | None = g
        self.grads: Tensor | None = None
        self._sq: Tensor | None = None
        self._mass: Tensor | None = None
        if not ghost:
            dt = compute_dtype(a, g)
            self.grads = torch.bmm(g.to(dt).transpose(1, 2), a.to(dt))
            self.a = self.g = None

    def _factors(self) -> tuple[Tensor, Tensor]:
        assert self.a is not None and self.g is not None
        return self.a, self.g

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            if self.grads is not None:
                self._sq = _inst_sq(self.grads)
                self._mass = self._sq.sqrt()
            else:
                self._sq, self._mass = ghost_sq_bound(*self._factors())
        return self._sq

    def mass(self) -> Tensor:
        self.sq_norms()
        assert self._mass is not None
        return self._mass

    slack = slack_from_parts

    def slack_parts(self) -> SlackParts:
        if self.grads is not None:  # mass is √sq_norms
            return weighted_sum_error(0, self.grads.shape[0], self.grads.dtype,
                                      self.grads.device), None
        a, g = self._factors()
        return weighted_sum_error(self.terms, a.shape[0], compute_dtype(a, g), a.device), self.mass()

    def weighted_sum(self, weights: Tensor, dropped: Tensor | None = None) -> Tensor:
        if self.grads is not None:
            return _inst_weighted_sum(self.grads, weights, dropped).reshape(self.grads.shape[1:])
        a, g = self._factors()
        dt = compute_dtype(a, g)
        gw = g.to(dt) * weights.to(dt).view(-1, 1, 1)
        a_ = a.to(dt)
        if dropped is not None:
            gw = torch.where(dropped.view(-1, 1, 1), 0.0, gw)
            a_ = torch.where(dropped.view(-1, 1, 1), 0.0, a_)
        return gw.reshape(-1, gw.shape[-1]).t() @ a_.reshape(-1, a_.shape[-1])

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.grads is not None:
            return self.grads if dtype is None else self.grads.to(dtype)
        a, g = self._factors()
        dt = dtype or compute_dtype(a, g)
        return torch.bmm(g.to(dt).transpose(1, 2), a.to(dt))

    def inner_bound(self, other: Contribution) -> tuple[Tensor, Tensor] | None:
        if isinstance(other, LinearFactors):
            if self.grads is None and other.grads is None:
                a1, g1 = self._factors()
                a2, g2 = other._factors()
                aa = torch.bmm(a1.to(F64), a2.to(F64).transpose(1, 2))
                gg = torch.bmm(g1.to(F64), g2.to(F64).transpose(1, 2))
                n = a1.shape[2] + g1.shape[2] + a1.shape[1] * a2.shape[1] + 4
                return (aa * gg).sum((1, 2)), gamma(n, U64) * self.mass() * other.mass()
            if self.grads is not None and other.grads is not None:
                return _dot_rows(_rows(self.grads), _rows(other.grads), self.mass(), other.mass())
            inst, fac = (self, other) if self.grads is not None else (other, self)
            assert inst.grads is not None
            return fac._pair_instantiated(inst.grads, inst.mass())
        if isinstance(other, PerSampleGrads):
            if self.grads is not None:
                return _dot_rows(_rows(self.grads), _rows(other.grads), self.mass(), other.mass())
            return self._pair_instantiated(other.grads, other.mass())
        return None

    def _pair_instantiated(self, grads: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
        """``Σ_t g_tᵀ H a_t`` in float64 for instantiated ``H`` of the same region."""
        a, g = self._factors()
        h = grads.reshape(-1, *self.region_shape()).to(F64)
        ga = torch.bmm(g.to(F64), h)  # (B, T, d)
        n = g.shape[2] + a.shape[1] * a.shape[2] + 4
        return (ga * a.to(F64)).sum((1, 2)), gamma(n, U64) * self.mass() * mass


# ---------------------------------------------------------------- combining uses
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
    fx, fy = _rows(_full(x)), _rows(_full(y))
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
        root = uses[0].sq_norms().clamp(min=0).sqrt_()
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
    formed together, stacked in one ``(P, B)`` tensor. The float64 sum over
    the parameters is grown by its own rounding.

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
    if not based and not plain:
        return rest
    assert big is not None
    roots = torch.stack([t[0] for t in based] + [t[0] for t in plain]).clamp_(min=0).sqrt_()
    dev = roots.device
    if based:
        thetas = torch.tensor([t[2] for t in based], dtype=F64, device=dev).unsqueeze(1)
        roots[: len(based)].addcmul_(torch.stack([t[1] for t in based]), thetas)
    factors = [t[3] for t in based] + [t[1] for t in plain]
    roots.mul_(torch.tensor(factors, dtype=F64, device=dev).unsqueeze(1))
    bounds = torch.where(roots <= big, roots, math.inf)
    total = bounds.square_().sum(0)
    if rest is not None:
        total = total + rest
    return total.mul_(1.0 + gamma(n + 1, U64))


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


def _rows(t: Tensor) -> Tensor:
    """``(B, n)`` view of a per-example tensor, safe for ``B = 0``."""
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)
