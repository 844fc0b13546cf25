"""Per-example gradient contributions and how they combine.

A layer rule turns the activations and output gradients of one *use* of a
parameter into a :class:`Contribution`: something that can report each
example's squared gradient norm, the clipped (weighted) sum ``Σ_i w_i G_i``
and, when needed, the instantiated per-example gradients ``G_i``.

A parameter used several times (tied embeddings, a module called twice, a
recurrent weight) gets several contributions; its per-example gradient is
their sum, so its squared norm has cross terms, computed by
:func:`pair_inner` (ghost style when both sides allow it).
"""

from __future__ import annotations

import torch
from torch import Tensor

Region = tuple[slice, ...] | None


class Contribution:
    """One use of one parameter, for every example of the batch.

    Attributes:
        param: the parameter this use contributes to.
        region: the part of ``param`` covered (``None``: all of it). Two
            contributions with different, non-``None`` regions are disjoint.
    """

    param: Tensor
    region: Region = None

    def sq_norms(self) -> Tensor:
        """Per-example squared Frobenius norms, shape ``(B,)``."""
        raise NotImplementedError

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``Σ_i weights_i G_i``, shaped like the covered region of ``param``."""
        raise NotImplementedError

    def instantiate(self) -> Tensor:
        """Per-example gradients ``G``, shape ``(B, *region_shape)``."""
        raise NotImplementedError

    def inner(self, other: Contribution) -> Tensor | None:
        """Per-example ``⟨G_i, H_i⟩`` with another use of the same region.

        Returns ``None`` when this class has no cheaper way than
        instantiating both sides.
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

    def sq_norms(self) -> Tensor:
        return _sq_rows(self.grads)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        flat = _rows(self.grads)
        return (weights.to(flat.dtype) @ flat).reshape(self.grads.shape[1:])

    def instantiate(self) -> Tensor:
        return self.grads

    def inner(self, other: Contribution) -> Tensor | None:
        if isinstance(other, PerSampleGrads):
            a = _rows(self.grads)
            b = _rows(other.grads)
            return (a * b).sum(1)
        return None


class NormOnly(Contribution):
    """The per-example squared norms of a use, with everything else freed (ghost pass 1)."""

    def __init__(self, source: Contribution) -> None:
        self.param = source.param
        self.region = source.region
        self._sq = source.sq_norms()

    def sq_norms(self) -> Tensor:
        return self._sq


class LinearFactors(Contribution):
    """``G_i = g_iᵀ a_i`` kept factored: ``a`` is ``(B, T, d)``, ``g`` is ``(B, T, p)``.

    When ``ghost`` is false the per-example gradients are instantiated at once
    (``B × p × d``) and the factors dropped; otherwise norms come from the
    ghost identity ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩`` and the clipped sum from
    ``(w ⊙ g)ᵀ a``.
    """

    def __init__(
        self, param: Tensor, a: Tensor, g: Tensor, *, ghost: bool, region: Region = None
    ) -> None:
        self.param = param
        self.region = region
        self.ghost = ghost
        self.a: Tensor | None = a
        self.g: Tensor | None = g
        self.grads: Tensor | None = None
        self._sq: Tensor | None = None
        if not ghost:
            self.grads = torch.bmm(g.transpose(1, 2), a)
            self.a = self.g = None

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            if self.grads is not None:
                self._sq = _sq_rows(self.grads)
            else:
                assert self.a is not None and self.g is not None
                self._sq = _ghost_sq_norms(self.a, self.g)
        return self._sq

    def weighted_sum(self, weights: Tensor) -> Tensor:
        if self.grads is not None:
            flat = _rows(self.grads)
            return (weights.to(flat.dtype) @ flat).reshape(self.grads.shape[1:])
        assert self.a is not None and self.g is not None
        gw = self.g * weights.to(self.g.dtype).view(-1, 1, 1)
        return gw.reshape(-1, gw.shape[-1]).t() @ self.a.reshape(-1, self.a.shape[-1])

    def instantiate(self) -> Tensor:
        if self.grads is not None:
            return self.grads
        assert self.a is not None and self.g is not None
        return torch.bmm(self.g.transpose(1, 2), self.a)

    def inner(self, other: Contribution) -> Tensor | None:
        if isinstance(other, LinearFactors):
            if self.grads is None and other.grads is None:
                assert self.a is not None and self.g is not None
                assert other.a is not None and other.g is not None
                aa = torch.bmm(self.a, other.a.transpose(1, 2))
                gg = torch.bmm(self.g, other.g.transpose(1, 2))
                return (aa * gg).sum((1, 2))
            if self.grads is not None and other.grads is not None:
                return _rows(self.grads * other.grads).sum(1)
            inst, fac = (self, other) if self.grads is not None else (other, self)
            assert inst.grads is not None and fac.a is not None and fac.g is not None
            # Σ_t g_tᵀ G a_t
            ga = torch.bmm(fac.g, inst.grads)  # (B, T, d)
            return (ga * fac.a).sum((1, 2))
        if isinstance(other, PerSampleGrads):
            if self.grads is not None:
                return _rows(self.grads * other.grads).sum(1)
            assert self.a is not None and self.g is not None
            ga = torch.bmm(self.g, other.grads.reshape(-1, *self.region_shape()))
            return (ga * self.a).sum((1, 2))
        return None


def _ghost_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """``‖g_iᵀ a_i‖²_F`` for every example without forming ``g_iᵀ a_i``."""
    if a.shape[1] == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    aa = torch.bmm(a, a.transpose(1, 2))
    gg = torch.bmm(g, g.transpose(1, 2))
    return (aa * gg).sum((1, 2))


def _full(c: Contribution) -> Tensor:
    """Instantiate ``c`` into a ``(B, *param.shape)`` tensor (zeros outside its region)."""
    g = c.instantiate()
    if c.region is None:
        return g
    out = g.new_zeros((g.shape[0], *c.param.shape))
    out[(slice(None), *c.region)] = g
    return out


def pair_inner(x: Contribution, y: Contribution) -> Tensor:
    """Per-example inner product of two uses of the same parameter."""
    if x.region is not None and y.region is not None and x.region != y.region:
        if _disjoint(x.region, y.region):
            return x.sq_norms().new_zeros(x.sq_norms().shape)
    if x.region == y.region:
        r = x.inner(y)
        if r is None:
            r = y.inner(x)
        if r is not None:
            return r
    fx, fy = _full(x), _full(y)
    return _rows(fx * fy).sum(1)


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
    """Per-example squared norm of the sum of all uses of one parameter."""
    total = uses[0].sq_norms().clone()
    for k in range(1, len(uses)):
        total = total + uses[k].sq_norms()
        for j in range(k):
            total = total + 2.0 * pair_inner(uses[j], uses[k])
    return total


def param_weighted_sum(param: Tensor, uses: list[Contribution], weights: Tensor) -> Tensor:
    """``Σ_i w_i G_i`` for one parameter, summed over its uses."""
    if len(uses) == 1 and uses[0].region is None:
        return uses[0].weighted_sum(weights).reshape(param.shape).to(param.dtype)
    out = torch.zeros_like(param)
    for c in uses:
        s = c.weighted_sum(weights).to(out.dtype)
        if c.region is None:
            out += s.reshape(param.shape)
        else:
            out[c.region] += s.reshape(out[c.region].shape)
    return out


def _rows(t: Tensor) -> Tensor:
    """``(B, n)`` view of a per-example tensor, safe for ``B = 0``."""
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)


def _sq_rows(t: Tensor) -> Tensor:
    """Per-example squared norms of ``(B, ...)`` without a full-size temporary."""
    return torch.linalg.vector_norm(_rows(t), dim=1).square()
