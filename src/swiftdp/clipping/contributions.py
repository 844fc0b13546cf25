"""Per-example gradient contributions: one use of one parameter, for every example.

A layer rule turns the activations and output gradients of one *use* of a
parameter into a :class:`Contribution`: something that can report each
example's squared gradient norm (an upper bound that rounding cannot shrink),
the clipped (weighted) sum ``Σ_i w_i G_i`` and, when needed, the instantiated
per-example gradients ``G_i``. This module has the generic kinds:
instantiated gradients (:class:`PerSampleGrads`), the factored ``gᵀ a`` of
linear layers (:class:`LinearFactors`) and norms alone (:class:`NormOnly`);
the layer families add their own (``ConvFactors``, ``EmbeddingGrads``).

How the uses of a parameter combine into one norm bound and one clipped sum
is :mod:`swiftdp.clipping.combine`; the rounding model and the norm kernels
are :mod:`swiftdp.clipping.rounding`. Both are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from swiftdp.clipping.combine import (
    SlackParts,
    dropped_examples,
    pair_inner,
    pair_inner_bound,
    param_sq_norms,
    param_weighted_sum,
    slack_from_parts,
    total_sq_norms,
)
from swiftdp.clipping.combine import rows as _rows
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

Region = tuple[slice, ...] | None

__all__ = [
    "F64", "U64", "Contribution", "LinearFactors", "NormOnly", "PerSampleGrads", "Region",
    "SlackParts", "compute_dtype", "dropped_examples", "gamma", "ghost_sq_bound",
    "instantiated_sq_norms",
    "matmul_input_roundoff", "max_finite", "norms_f64", "pair_inner", "pair_inner_bound",
    "param_sq_norms", "param_weighted_sum", "slack_from_parts", "sq_norms_f64", "term_error",
    "total_sq_norms", "unit_roundoff", "weighted_sum_error",
]


# ------------------------------------------------------------------ helpers
def instantiated_sq_norms(grads: Tensor) -> Tensor:
    """Per-example squared norms of instantiated ``(B, ...)`` gradients (float64, upper bound).

    Float64 sums block by block (:func:`sq_norms_f64`): no ``(B, |w|)`` float64 copy.
    """
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

    def merge_rows(self, per: int) -> Contribution | None:
        """This use with each example's ``per`` consecutive rows summed into one, or ``None``.

        For a layer that saw a merged batch ``(B * per, ...)`` (the views of
        augmentation multiplicity) as ``B * per`` examples: the result is the
        per-example contribution over the ``B`` examples. ``None`` when this
        kind cannot do it (the engine then refuses the layer).
        """
        return None

    def region_shape(self) -> torch.Size:
        """Shape of the covered part of ``param``."""
        if self.region is None:
            return self.param.shape
        return self.param[self.region].shape


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
            self._sq = instantiated_sq_norms(self.grads)
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

    def merge_rows(self, per: int) -> PerSampleGrads:
        g = self.grads  # summed in the compute dtype (>= float32), as the clipped sum is
        rows = g.to(compute_dtype(g)).reshape(g.shape[0] // per, per, *g.shape[1:]).sum(1)
        return PerSampleGrads(self.param, rows, self.region)

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
        parts = source.slack_parts() if type(source).slack is slack_from_parts else None
        # the source's parts (its sq_norms are kept), or its slack itself as the base
        self._parts: SlackParts = parts if parts is not None else (1.0, source.slack())

    def sq_norms(self) -> Tensor:
        return self._sq

    slack = slack_from_parts

    def slack_parts(self) -> SlackParts:
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
                self._sq = instantiated_sq_norms(self.grads)
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
