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

Rounding model: in a batched sum over examples each example's terms are
rounded at most ``T + B + 1`` times (``γ_n = n u / (1 - n u)`` per term, ``u``
the unit roundoff of the compute dtype, at least float32; TF32 matmuls count
as ``u = 2⁻¹¹`` on their inputs). This is exact for any summation order when
an example has one term per output entry (instantiated gradients, ``T = 1``,
embeddings after merging repeated rows).

An example whose weight is zero (its norm was not finite) is dropped exactly:
its factors are masked with ``torch.where`` (``0 · inf`` is NaN), so the
others' clipped sum is unchanged.

References:
    Higham. Accuracy and stability of numerical algorithms, 2nd ed., 2002
    (§3.1, 3.5: ``γ_n`` and inner products).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Region = tuple[slice, ...] | None
F64 = torch.float64
U64 = 2.0**-53


# --------------------------------------------------------------------- rounding
def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a floating dtype (``2⁻²⁴`` for float32, ``2⁻⁸`` for bfloat16)."""
    return float(torch.finfo(dtype).eps) / 2.0


def gamma(n: int, u: float) -> float:
    """``γ_n = n u / (1 - n u)``, the relative error of ``n`` roundings (inf when ``n u >= 1``)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype norms and clipped sums are computed in: the inputs' promotion, at least float32."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def matmul_input_roundoff(dtype: torch.dtype, device: torch.device, *, conv: bool = False) -> float:
    """Relative rounding of a float32 matmul's (or convolution's) inputs under TF32 / bf16 modes.

    Args:
        dtype: the matmul's dtype (only float32 has reduced-precision modes).
        device: where it runs.
        conv: a cuDNN convolution (``torch.backends.cudnn.allow_tf32``, on by default).

    Returns:
        0 for exact inputs, ``2⁻¹¹`` for TF32, ``2⁻⁸`` for bf16 (``"medium"`` precision).
    """
    if dtype != torch.float32:
        return 0.0
    prec = torch.get_float32_matmul_precision()
    u = 0.0 if prec == "highest" else 2.0**-11 if prec == "high" else 2.0**-8
    if device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
        if tf32:
            u = max(u, 2.0**-11)
    return u


def term_error(n: int, dtype: torch.dtype, device: torch.device, *, conv: bool = False) -> float:
    """Relative error bound of each term of an ``n``-term dot product computed in ``dtype``."""
    ui = matmul_input_roundoff(dtype, device, conv=conv)
    return (1.0 + ui) ** 2 * (1.0 + gamma(n, unit_roundoff(dtype))) - 1.0


def weighted_sum_error(
    terms: int, batch: int, dtype: torch.dtype, device: torch.device, *, conv: bool = False
) -> float:
    """Relative rounding ``θ`` of one term ``w_i x_{i,t}`` of a clipped sum over the batch.

    The weight is cast to ``dtype`` and multiplied in (two roundings), then the
    term is accumulated (``terms + batch + 1`` roundings, see the module notes).
    """
    u = unit_roundoff(dtype)
    return (1.0 + u) ** 2 * (1.0 + term_error(terms + batch + 1, dtype, device, conv=conv)) - 1.0


def ghost_sq_bound(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Upper bounds on ``‖g_iᵀ a_i‖²_F`` without forming ``g_iᵀ a_i``, and the masses ``N_i``.

    With ``A = a aᵀ`` and ``Γ = g gᵀ`` (``T × T`` per example) formed in the
    compute dtype, each entry is off by at most ``θ_d ‖a_t‖‖a_s‖`` (``θ_p``
    for ``Γ``), so ``|⟨A, Γ⟩ − ⟨Â, Γ̂⟩| ≤ θ_d nₐᵀ|Γ̂|nₐ + θ_p n_gᵀ|Â|n_g + θ_d θ_p N²``
    with ``nₐ = (‖a_t‖)_t`` read off ``diag Â``; the sum ``Σ_s Â_ts Γ̂_ts`` of
    each row adds ``γ_T Σ|Â Γ̂| ≤ γ_T (1+θ_d) nₐᵀ|Γ̂|nₐ``, the rows are summed in
    float64. For honest inputs the bound adds about ``(θ_d + γ_T)(1 + T/√p)``
    to the relative error of ``‖G_i‖²`` (≈ 1e-4 in float32 at ``d = p = 256``,
    ``T = 128``); for a crafted cancelling input it keeps the norm honest
    (about ``√θ_d · N_i`` instead of zero).

    Args:
        a: activations ``(B, T, d)``.
        g: output gradients ``(B, T, p)``.

    Returns:
        ``(sq, mass)`` in float64, shape ``(B,)``: ``sq >= ‖g_iᵀ a_i‖²`` and
        ``mass = Σ_t ‖a_t‖‖g_t‖ >= ‖g_iᵀ a_i‖`` (upper bounds); non-finite
        where the example's inputs are (or its Gram matrices overflow).
    """
    B, T, d = a.shape
    p = g.shape[2]
    if B == 0:
        z = a.new_zeros(0, dtype=F64)
        return z, z
    dt = compute_dtype(a, g)
    if T == 1:
        na = torch.linalg.vector_norm(a.reshape(B, d), dim=1, dtype=F64)
        ng = torch.linalg.vector_norm(g.reshape(B, p), dim=1, dtype=F64)
        mass = (na * ng) * (1.0 + gamma(d + p + 4, U64))
        return mass * mass, mass
    a_, g_ = a.to(dt), g.to(dt)
    aa = torch.bmm(a_, a_.transpose(1, 2))
    gg = torch.bmm(g_, g_.transpose(1, 2))
    # Σ_s Â_ts Γ̂_ts in dt (T terms), then over t in float64
    sq = torch.linalg.vecdot(aa, gg).to(F64).sum(1)
    th_a, th_g = term_error(d, dt, a.device), term_error(p, dt, a.device)
    na = (aa.diagonal(dim1=1, dim2=2).to(F64) / (1.0 - th_a)).sqrt()  # >= ‖a_t‖
    ng = (gg.diagonal(dim1=1, dim2=2).to(F64) / (1.0 - th_g)).sqrt()
    # quadratic forms nₐᵀ|Γ̂|nₐ and n_gᵀ|Â|n_g (positive terms, rounding covered by `grow`)
    u = unit_roundoff(dt)
    grow = (1.0 + u) ** 2 * (1.0 + gamma(T + 4, u))
    qa = (torch.linalg.vecdot(gg.abs_(), na.to(dt).unsqueeze(1)).to(F64) * na).sum(1) * grow
    qg = (torch.linalg.vecdot(aa.abs_(), ng.to(dt).unsqueeze(1)).to(F64) * ng).sum(1) * grow
    mass = (na * ng).sum(1) * (1.0 + gamma(T + 2, U64))
    # the products and their row sums rounded in dt (Σ|ÂΓ̂| <= (1+θ_a) qa)
    prod_err = (gamma(T + 2, u) + gamma(T + 2, U64)) * (1.0 + th_a) * qa
    err = th_a * qa + th_g * qg + th_a * th_g * mass * mass + prod_err
    return (sq + err).clamp(min=0), mass


def _inst_sq(grads: Tensor) -> Tensor:
    """Per-example squared norms of instantiated ``(B, ...)`` gradients (float64, upper bound)."""
    rows = _rows(grads)
    n = torch.linalg.vector_norm(rows, dim=1, dtype=F64)
    return n.square() * (1.0 + gamma(rows.shape[1] + 2, U64))


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


class PerSampleGrads(Contribution):
    """Instantiated per-example gradients ``(B, *shape)``."""

    def __init__(self, param: Tensor, grads: Tensor, region: Region = None) -> None:
        self.param = param
        self.grads = grads
        self.region = region
        self._sq: Tensor | None = None

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            self._sq = _inst_sq(self.grads)
        return self._sq

    def slack(self) -> Tensor:
        return _inst_slack(self.sq_norms(), compute_dtype(self.grads), self.grads.device)

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
        self._slack = source.slack()

    def sq_norms(self) -> Tensor:
        return self._sq

    def slack(self) -> Tensor:
        return self._slack


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

    def slack(self) -> Tensor:
        if self.grads is not None:
            return _inst_slack(self.sq_norms(), self.grads.dtype, self.grads.device)
        a, g = self._factors()
        dt = compute_dtype(a, g)
        return weighted_sum_error(self.terms, a.shape[0], dt, a.device) * self.mass()

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
    cast to the parameter's dtype. Summed over parameters and square-rooted,
    it bounds the norm of everything added for the example divided by its
    weight (Minkowski), so clipping with it keeps each example within ``C``.
    A bound beyond the largest finite float32 (float64 for float64 models) is
    reported as ``inf``: the example's gradient is not representable and is
    dropped (see :func:`~swiftdp.clipping.clip_fns.clip_factors`).

    Returns:
        float64 ``(B,)``; NaN or inf for examples whose gradient is not finite.
    """
    param = uses[0].param
    total = uses[0].sq_norms().clone()
    slack = uses[0].slack().clone()
    for k in range(1, len(uses)):
        total = total + uses[k].sq_norms()
        slack = slack + uses[k].slack()
        for j in range(k):
            v, e = pair_inner_bound(uses[j], uses[k])
            total = total + 2.0 * (v + e)
    bound = total.clamp(min=0).sqrt() + slack
    bound = bound * (1.0 + gamma(len(uses) + 1, unit_roundoff(param.dtype)))
    big = torch.finfo(compute_dtype(param)).max
    bound = torch.where(bound <= big, bound, math.inf)
    return bound * bound


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
    acc = torch.promote_types(param.dtype, torch.float32)
    if len(uses) == 1 and uses[0].region is None:
        s = uses[0].weighted_sum(weights, dropped).reshape(param.shape)
        return s.to(torch.promote_types(s.dtype, acc))
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
