"""Convolutions (``torch.conv1d``, ``torch.conv2d``, ``torch.conv3d``).

A convolution is a linear layer on unfolded patches, one per group: for group
``k`` the activations ``a_k`` are ``(B, T, C_in/groups · ∏kernel)`` with ``T``
the output positions, the output gradients ``g_k`` are ``(B, T,
C_out/groups)`` and example ``i``'s weight gradient for the group is
``g_{k,i}ᵀ a_{k,i}``. Per layer, per batch, the cost model picks:

* ghost norm: ``‖G_i‖² = Σ_k ⟨a_k a_kᵀ, g_k g_kᵀ⟩`` (one unfold, freed at once;
  an upper bound that rounding cannot cancel, see ``ghost_sq_bound``);
* instantiation: the per-example weight gradients ``(B, *weight.shape)``, by
  the native weight-gradient kernel on a convolution whose groups are the
  examples × the groups (no unfold), or by unfold and a batched matmul when
  there are few output positions and many channels.

The clipped sum ``Σ_i w_i G_i`` is one native weight-gradient convolution
with the output gradient scaled per example (ghost side), or ``w @ G``
(instantiated side). Every group is handled on its own, depthwise included.
Non-zero ``padding_mode`` reaches the rule as ``F.pad`` followed by a
convolution with zero padding, and needs nothing special.

References:
    Goodfellow. Efficient per-example gradient computations. 2015.
    Rochette, Manoel, Tramel. Efficient per-example gradient computations in
    convolutional neural networks. 2019. Bu, Mao, Xu. Scalable and efficient
    training of large convolutional neural networks with differential
    privacy. NeurIPS 2022. Bu et al. Differentially private optimization on
    large model at small cost. ICML 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swiftdp.clipping.contract import Decline
from swiftdp.clipping.contributions import (
    U64,
    Contribution,
    PerSampleGrads,
    SlackParts,
    compute_dtype,
    gamma,
    ghost_sq_bound,
    instantiated_sq_norms,
    max_finite,
    slack_from_parts,
    sq_norms_f64,
    term_error,
    weighted_sum_error,
)
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind, check_batch
from swiftdp.layers.conv_geometry import ConvSpec, make_spec, patches, per_example_weight_grads

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder

_NDIM = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

__all__ = [
    "ConvFactors", "ConvSpec", "conv_rule", "factor_mass", "ghost_norm_bounds", "make_spec",
    "patches", "per_example_weight_grads",
]


def ghost_norm_bounds(x: Tensor, g: Tensor, spec: ConvSpec, per: int = 1) -> tuple[Tensor, Tensor]:
    """Upper bounds on ``Σ_k ‖g_{k,i}ᵀ a_{k,i}‖²`` without forming the gradients, and the masses.

    Per group, :func:`~swiftdp.clipping.contributions.ghost_sq_bound` on the
    unfolded patches (float64 sums, Gram rounding bounded, so cancelling
    inputs cannot hide a large gradient).

    Args:
        x: input ``(B, C_in, *S)``.
        g: output gradient ``(B, C_out, *S_out)``.
        spec: the convolution geometry.
        per: rows per example (a merged batch ``(B * per, ...)``): each
            example's positions are those of its ``per`` rows.

    Returns:
        ``(sq, mass)``, float64 ``(B,)``: squared-norm bounds and
        ``Σ_k Σ_t ‖a_{k,t}‖‖g_{k,t}‖``; the unfolded input is freed on return.
    """
    b, groups = g.shape[0], spec.groups
    if b == 0:
        z = g.new_zeros(0, dtype=torch.float64)
        return z, z
    positions = math.prod(g.shape[2:])
    a = _per_example(patches(x, spec), b // per, per, groups, positions)
    gk = _per_example(g, b // per, per, groups, positions)
    sq, mass = ghost_sq_bound(a, gk)
    return sq.view(b // per, groups).sum(1), mass.view(b // per, groups).sum(1)


def _per_example(t: Tensor, b: int, per: int, groups: int, positions: int) -> Tensor:
    """``(b * per, groups * c, *S)`` rows as ``(b * groups, per * positions, c)``, example-major."""
    if per == 1:
        return t.reshape(b * groups, -1, positions).transpose(1, 2)
    v = t.reshape(b, per, groups, -1, positions).permute(0, 2, 1, 4, 3)
    return v.reshape(b * groups, per * positions, v.shape[-1])


def factor_mass(x: Tensor, g: Tensor, spec: ConvSpec, per: int = 1) -> Tensor:
    """Per example, an upper bound on ``Σ_k Σ_t ‖a_{k,t}‖‖g_{k,t}‖`` without unfolding.

    Each input element lies in at most ``∏kernel`` patches (one per kernel
    offset), so ``Σ_t ‖a_{k,t}‖² <= ∏kernel · ‖x_k‖²`` and, by Cauchy–Schwarz
    over the positions, ``Σ_t ‖a_{k,t}‖‖g_{k,t}‖ <= √(∏kernel) ‖x_k‖ ‖g_k‖``
    (``x_k``, ``g_k``: one example's channels of group ``k``). Looser than the
    patch-by-patch mass of :func:`ghost_norm_bounds`, which only rounding
    terms multiply, and two float64 reductions instead of an unfold.

    An example whose input has ``‖x_i‖²`` beyond the compute dtype's range
    gets ``inf`` (it is then dropped, as the ghost side's overflowing Gram
    matrices drop it): the clipped sum scales ``g`` by the example's weight,
    and a product that lands among the subnormals is off by up to ``2⁻¹⁵⁰``
    absolutely, not relatively; the input it then multiplies must stay small
    enough that this adds nothing measurable (below ``1e-20`` for any
    realistic layer, against ``C · 1e-4`` with a ``3e38`` input).

    Args:
        x: input ``(B * per, C_in, *S)``.
        g: output gradient ``(B * per, C_out, *S_out)``.
        spec: the convolution geometry.
        per: rows per example.

    Returns:
        float64 ``(B,)``.
    """
    rows, groups = g.shape[0], spec.groups
    if rows == 0:
        return g.new_zeros(0, dtype=torch.float64)
    sx, kx = sq_norms_f64(x.reshape(rows * groups, -1))
    sg, kg = sq_norms_f64(g.reshape(rows * groups, -1))
    too_big = sx.view(rows // per, -1).sum(1) > max_finite(compute_dtype(x, g))
    m = sx.mul_(math.prod(spec.kernel)).sqrt_().mul_(sg.sqrt_())
    m = m.view(rows // per, per * groups).sum(1)
    # the float64 sums of squares (γ_k), two square roots, the products and the sum
    m = m.mul_(1.0 + gamma(max(kx, kg) + per * groups + 6, U64))
    return m.masked_fill_(too_big, math.inf)


def _instantiation_error(terms: int, dtype: torch.dtype, device: torch.device) -> float:
    """Relative rounding of each term of an instantiated per-example conv gradient entry.

    Either kernel may form it (native weight gradient, or unfold and matmul),
    so the larger of the two input roundings is taken.
    """
    return max(term_error(terms + 2, dtype, device, conv=c) for c in (True, False))


class ConvFactors(Contribution):
    """The per-example gradients of one use of a convolution weight.

    With ``ghost`` the input ``x`` and output gradient ``g`` are kept: norms by
    the ghost identity (the patches are built and freed inside
    :meth:`sq_norms`), clipped sum by one native weight-gradient convolution.
    Otherwise the per-example gradients are instantiated (in the compute
    dtype, at least float32, as ghost clipping's second pass forms the sum):

    * at once, ``x`` and ``g`` dropped, the clipped sum ``w @ G``;
    * with ``keep_factors``, only inside :meth:`sq_norms` and freed there, the
      clipped sum formed from ``x`` and ``g`` by one native weight-gradient
      convolution, as on the ghost side. For layers whose ``x`` and ``g`` are
      much smaller than their per-example gradients (many channels, small
      maps), this holds the factors, not the gradients, to the end of the
      backward. The norm bound then covers the exact gradient: the
      instantiated one's norm plus its rounding (``θ · mass``, the mass of
      :func:`factor_mass`), so every pairing and the slack of the factored sum
      refer to the same exact gradient.

    Args:
        param: the convolution weight.
        x: the detached input ``(B, C_in, *S)``.
        g: the output gradient ``(B, C_out, *S_out)``.
        spec: the convolution geometry.
        ghost: whether to keep the factors rather than instantiate.
        keep_factors: when not ``ghost``, instantiate for the norms only.

    With :meth:`merge_rows` (a merged batch ``(B * per, ...)``, the views of
    augmentation multiplicity) each example's gradient is the sum over its
    ``per`` rows: its norm by the ghost identity over all its rows'
    positions, its clipped sum by one convolution with each row weighted by
    its example's factor.
    """

    def __init__(self, param: Tensor, x: Tensor, g: Tensor, spec: ConvSpec, *, ghost: bool,
                 keep_factors: bool = False) -> None:
        self.param = param
        self.region = None
        self.spec = spec
        self.x: Tensor | None = x
        self.g: Tensor | None = g
        self.grads: Tensor | None = None
        self.per = 1  # rows per example
        self.terms = math.prod(g.shape[2:])
        self._sq: Tensor | None = None
        self._mass: Tensor | None = None
        self.hybrid = not ghost and keep_factors  # instantiated for the norms only
        if not ghost and not keep_factors:
            self._instantiate_now()

    def _instantiate_now(self) -> None:
        # in the compute dtype: bf16 factors would round the gradients
        self.grads = self.instantiate()
        self.x = self.g = None
        self.hybrid = False

    def _factors(self) -> tuple[Tensor, Tensor]:
        assert self.x is not None and self.g is not None
        return self.x, self.g

    def merge_rows(self, per: int) -> ConvFactors:
        assert self._sq is None and self.per == 1
        if self.grads is not None:
            g = self.grads
            self.grads = g.reshape(g.shape[0] // per, per, *g.shape[1:]).sum(1)
        self.per = per
        self.terms *= per
        if self.hybrid:
            x, g = self._factors()
            if 2 * per * (math.prod(x.shape[1:]) + math.prod(g.shape[1:])) > self.param.numel():
                self._instantiate_now()  # an example's rows now outweigh its gradient
        return self

    def _rows(self, t: Tensor) -> Tensor:
        """Per-example values ``(B, ...)`` repeated for each of the example's rows."""
        return t if self.per == 1 else t.repeat_interleave(self.per, 0)

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            if self.grads is not None:
                self._sq = instantiated_sq_norms(self.grads)
                self._mass = self._sq.sqrt()
            elif self.hybrid:
                self._sq, self._mass = self._hybrid_bounds()
            else:
                x, g = self._factors()
                self._sq, self._mass = ghost_norm_bounds(x, g, self.spec, self.per)
        return self._sq

    def _hybrid_bounds(self) -> tuple[Tensor, Tensor]:
        """``keep_factors``: ``(√‖Ĝ_i‖² + θ · mass_i)²`` from the gradients ``Ĝ`` instantiated
        and freed here, and the mass of :func:`factor_mass`."""
        x, g = self._factors()
        sq = instantiated_sq_norms(self.instantiate())  # the gradients freed on return
        mass = factor_mass(x, g, self.spec, self.per)
        theta = _instantiation_error(self.terms, compute_dtype(x, g), x.device)
        root = sq.sqrt_().add_(mass, alpha=theta)
        return root.square_().mul_(1.0 + gamma(4, U64)), mass

    def mass(self) -> Tensor:
        self.sq_norms()
        assert self._mass is not None
        return self._mass

    slack = slack_from_parts

    def slack_parts(self) -> SlackParts:
        if self.grads is not None:  # mass is √sq_norms
            dt = compute_dtype(self.grads)
            return weighted_sum_error(0, self.grads.shape[0], dt, self.grads.device), None
        x, g = self._factors()
        positions = math.prod(g.shape[2:]) * self.per
        err = weighted_sum_error(positions, x.shape[0] // self.per, compute_dtype(x, g), x.device,
                                 conv=True)
        return err, self.mass()

    def weighted_sum(self, weights: Tensor, dropped: Tensor | None = None) -> Tensor:
        if self.grads is not None:
            flat = self.grads.flatten(1)
            dt = compute_dtype(flat)
            f = flat.to(dt) if dropped is None else torch.where(dropped.view(-1, 1), 0.0, flat.to(dt))
            return (weights.to(dt) @ f).view(self.param.shape)
        x, g = self._factors()
        dt = compute_dtype(x, g)
        if x.shape[0] == 0:
            return g.new_zeros(self.param.shape, dtype=dt)
        shape = (-1, *([1] * (g.dim() - 1)))
        gw = g.to(dt) * self._rows(weights.to(dt)).view(shape)
        x_ = x.to(dt)
        if dropped is not None:
            rows = self._rows(dropped)
            gw = torch.where(rows.view(shape), 0.0, gw)
            x_ = torch.where(rows.view(shape), 0.0, x_)
        return self.spec.weight_grad(x_, gw, tuple(self.param.shape), self.spec.groups)

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.grads is not None:
            return self.grads if dtype is None else self.grads.to(dtype)
        x, g = self._factors()
        dt = dtype or compute_dtype(x, g)
        grads = per_example_weight_grads(x.to(dt), g.to(dt), self.spec, tuple(self.param.shape))
        if self.per > 1:
            grads = grads.reshape(-1, self.per, *grads.shape[1:]).sum(1)
        return grads

    def pair_with(self, grads: Tensor) -> Tensor:
        """Per-example ``⟨G_i, H_i⟩`` with instantiated ``H`` ``(B, *weight.shape)``, in float64.

        Factored side: ``Σ_t ⟨g_{i,t}, (H_i ⋆ x_i)_t⟩``, one convolution of
        each example's input with its own kernel ``H_i`` (groups = examples ×
        groups), no unfold.
        """
        f64 = torch.float64
        if self.grads is not None:
            return (self.grads.flatten(1).to(f64) * grads.flatten(1).to(f64)).sum(1)
        x, g = self._factors()
        b = x.shape[0]
        if b == 0:
            return g.new_zeros(0, dtype=f64)
        rows = self._rows(grads)  # each row paired with its example's kernel
        kernels = rows.reshape(b * rows.shape[1], *rows.shape[2:]).to(f64)
        out = self.spec.convolve(x.reshape(1, -1, *x.shape[2:]).to(f64), kernels, b * self.spec.groups)
        pair = (out.reshape(b, -1) * g.reshape(b, -1).to(f64)).sum(1)
        return pair if self.per == 1 else pair.view(-1, self.per).sum(1)

    def inner_bound(self, other: Contribution) -> tuple[Tensor, Tensor] | None:
        if other.param.shape != self.param.shape or other.region is not None:
            return None
        if isinstance(other, PerSampleGrads):
            v = self.pair_with(other.grads)
        elif isinstance(other, ConvFactors):
            v = self.pair_with(other.grads) if other.grads is not None else other.pair_with(
                self.instantiate(torch.float64))
        else:
            return None
        # float64 throughout: instantiation (≤ T terms) plus a dot of ≤ |w| + T·C_out terms
        w = self.param[0].numel()
        n = w + 2 * self.terms * (self.param.shape[0] + 1) + 8
        return v, gamma(n, U64) * self.mass() * other.mass()


def _refuse_unbatched(rec: Recorder, x: Tensor, n: int) -> None:
    raise UnsupportedModuleError(
        f"In module `{rec.site.module_path}`, a {n}d convolution got an input of shape "
        f"{tuple(x.shape)}, without a batch dimension (expected (B, C, {n} spatial dims)). "
        "Per-example clipping needs batched inputs: add the batch dimension, e.g. "
        "`x.unsqueeze(0)`."
    )


def conv_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.conv{1,2,3}d`` (also ``F.conv{1,2,3}d`` and ``nn.Conv{1,2,3}d``).

    Raises:
        UnsupportedModuleError: the input has no batch dimension, the batch
            does not match, or the input was modified in place before the
            backward pass.
    """
    n = _NDIM[func]
    a = bind(_ARGS, args, kwargs, _DEFAULTS)
    x, weight, bias = a["input"], a["weight"], a["bias"]
    if rec.site.is_trainable(x):  # a parameter fed as the input: exact generic rule
        raise Decline
    if x.dim() != n + 2:
        _refuse_unbatched(rec, x, n)
    check_batch(rec.site, x, 0, f"the input of a {n}d convolution")
    w_t = rec.site.is_trainable(weight)
    b_t = bias is not None and rec.site.is_trainable(bias)
    wd = weight.detach() if w_t else weight
    bdt = bias.detach() if (bias is not None and b_t) else bias
    stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]
    xd = x.detach()
    version = xd._version
    path = rec.site.module_path

    def run() -> Tensor:
        return func(x, wd, bdt, stride, padding, dilation, groups)

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        out: list[Contribution] = []
        if w_t:
            if xd._version != version:
                raise UnsupportedModuleError(
                    f"In module `{path}`, the input of a convolution was modified in place "
                    "after the convolution used it, so its per-example weight gradients "
                    "cannot be formed. Make the in-place operation out of place "
                    "(e.g. `inplace=False`)."
                )
            spec, xe = make_spec(xd, tuple(weight.shape[2:]), stride, padding, dilation, groups)
            dtype = torch.promote_types(xe.dtype, g.dtype)
            xe, gw = xe.to(dtype), g.to(dtype)
            positions = math.prod(g.shape[2:])
            d = weight.shape[1] * math.prod(spec.kernel)
            p = weight.shape[0] // groups
            ghost = policy.factored_conv(positions, d, p)
            keep = not ghost and policy.conv_sum_from_factors(
                math.prod(xe.shape[1:]) + math.prod(gw.shape[1:]), weight.numel())
            out.append(ConvFactors(weight, xe, gw, spec, ghost=ghost, keep_factors=keep))
        if b_t:
            assert bias is not None
            out.append(PerSampleGrads(bias, g.sum(tuple(range(2, g.dim())))))
        return out

    return rec.track(run, [x], [weight if w_t else None, bias if b_t else None], build)
