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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
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
    max_finite,
    slack_from_parts,
    sq_norms_f64,
    term_error,
    weighted_sum_error,
)
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind, check_batch

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder

_NDIM = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

# Instantiation by unfold + batched matmul beats the batch-grouped native
# kernel only when there are very few output positions and many output
# channels per group (measured on CPU, see ``_use_unfold``).
_UNFOLD_MAX_POSITIONS = 16
_UNFOLD_MIN_OUT_PER_GROUP = 64
# ... and whenever each group has few inputs, unless its outputs are fewer still.
_UNFOLD_MAX_IN = 48
_UNFOLD_MIN_OUT_PER_GROUP_FEW_IN = 16
# Output rows at least this long: patches by a strided view's copy, not F.unfold.
_VIEW_MIN_ROW = 8


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of one convolution call, padding made explicit and symmetric.

    Attributes:
        kernel: kernel size per spatial dimension.
        stride: stride per spatial dimension.
        padding: zero padding on both sides, per spatial dimension.
        dilation: dilation per spatial dimension.
        groups: number of channel groups.
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.kernel)

    def weight_grad(self, x: Tensor, g: Tensor, weight_shape: tuple[int, ...], groups: int) -> Tensor:
        """Native weight gradient of a convolution of this geometry with ``groups`` groups.

        Args:
            x: input ``(N, C_in, *S)``.
            g: output gradient ``(N, C_out, *S_out)``.
            weight_shape: shape of the weight whose gradient is formed.
            groups: the group count of that convolution.

        Returns:
            ``Σ_n`` of the weight gradients, shaped ``weight_shape``.
        """
        template = g.new_empty(1).expand(weight_shape)
        return torch.ops.aten.convolution_backward(
            g, x, template, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * self.ndim, groups, [False, True, False],
        )[1]

    def convolve(self, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        """Forward convolution of this geometry with ``groups`` groups."""
        return torch.convolution(
            x, weight, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * self.ndim, groups,
        )


def _tuple(v: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return t * n
    if len(t) != n:
        raise ValueError(f"Expected `{name}` to have {n} entries, got {v!r}.")
    return t


def make_spec(
    x: Tensor, kernel: tuple[int, ...], stride: Any, padding: Any, dilation: Any, groups: int
) -> tuple[ConvSpec, Tensor]:
    """Explicit geometry of a call and the input it applies to.

    ``padding='same'`` with an even span is asymmetric (PyTorch pads the extra
    zero on the right); the input is then padded by the difference so that
    the remaining padding is symmetric, as PyTorch itself does.

    Args:
        x: the call's input ``(B, C_in, *S)``.
        kernel: the weight's spatial shape.
        stride: the call's ``stride``.
        padding: the call's ``padding`` (int, tuple, ``'same'`` or ``'valid'``).
        dilation: the call's ``dilation``.
        groups: the call's ``groups``.

    Returns:
        The geometry and the (possibly right-padded) input.
    """
    n = len(kernel)
    st, dil = _tuple(stride, n, "stride"), _tuple(dilation, n, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return ConvSpec(kernel, st, (0,) * n, dil, groups), x
        spans = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
        left = tuple(s // 2 for s in spans)
        extra = [s - 2 * (s // 2) for s in spans]
        if any(extra):
            pad: list[int] = []
            for e in reversed(extra):
                pad += [0, e]
            x = F.pad(x, pad)
        return ConvSpec(kernel, st, left, dil, groups), x
    return ConvSpec(kernel, st, _tuple(padding, n, "padding"), dil, groups), x


def patches(x: Tensor, spec: ConvSpec) -> Tensor:
    """Unfold the input into patches ``(B, C_in · ∏kernel, T)``, channel-major.

    By one copy of a strided view of the padded input, except for 2d maps
    whose output rows are short (under :data:`_VIEW_MIN_ROW` positions),
    where ``F.unfold`` is faster. Measured at B = 64, 3×3 kernels, 1 thread
    (ms, ``F.unfold`` against the view): 8×8 maps 64 channels 5.0 / 3.0,
    32×32 16 channels 37 / 24, 32×32 3 channels 3.3 / 0.6, a 1d length-128
    map 2.9 / 0.6; 4×4 maps 128 channels 2.5 / 4.1.

    Args:
        x: input ``(B, C_in, *S)``.
        spec: the convolution geometry.

    Returns:
        The patches, rows ordered like the flattened weight ``(C_in, *kernel)``.
    """
    n = spec.ndim
    if n == 2:
        span = spec.dilation[1] * (spec.kernel[1] - 1) + 1
        row = (x.shape[3] + 2 * spec.padding[1] - span) // spec.stride[1] + 1
        if row < _VIEW_MIN_ROW:
            return F.unfold(x, spec.kernel, dilation=spec.dilation, padding=spec.padding,
                            stride=spec.stride)
    pad: list[int] = []
    for p in reversed(spec.padding):
        pad += [p, p]
    v = F.pad(x, pad) if any(spec.padding) else x
    for i in range(n):
        span = spec.dilation[i] * (spec.kernel[i] - 1) + 1
        v = v.unfold(2 + i, span, spec.stride[i])
        if spec.dilation[i] > 1:
            v = v[..., :: spec.dilation[i]]
    # (B, C, *S_out, *kernel) -> (B, C, *kernel, *S_out)
    perm = (0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    b, c = v.shape[:2]
    return v.permute(perm).reshape(b, c * math.prod(spec.kernel), math.prod(v.shape[2 : 2 + n]))


def _use_unfold(positions: int, out_per_group: int, in_per_group: int) -> bool:
    """Whether unfold + batched matmul is the faster way to instantiate.

    The batch-grouped native kernel wins for large feature maps with many
    input channels, for depthwise or narrow groups, and down to 8×8 maps;
    unfold + matmul wins for tiny maps with many output channels per group,
    and for few inputs per group (``C_in/groups · ∏kernel`` up to
    :data:`_UNFOLD_MAX_IN`, stems and narrow 1×1 convs), where the native
    kernel's groups of a few channels run poorly. Measured with
    ``benchmarks/conv_layers.py`` and per shape (B = 64, 3×3 unless said;
    1 thread / 2 threads, ms, unfold against native): 8×8 maps 64→64 10.9 /
    22.9 against 10.1 / 10.9, 16×16 → 8×8 32→64 5.8 / 13.8 against 5.6 /
    10.8; 4×4 maps 128→128 34 / 48 against 77 / 101; the stem 3→16 on 32×32
    4.7 / 3.1 against 8.7 / 14.0, 3→64 4×4 patches stride 4 1.39 / 1.04
    against 1.49 / 1.04, a 1d 8→32 k5 length 256 0.78 / 1.54 against
    0.90 / 2.36; but 8→32 (72 inputs) 8.9 / 9.0 against 7.3 / 6.5, and
    depthwise 64 on 16×16 33 / 20 against 3.5 / 0.8.

    Args:
        positions: output positions ``T``.
        out_per_group: ``C_out / groups``.
        in_per_group: ``C_in / groups · ∏kernel``.
    """
    if out_per_group < _UNFOLD_MIN_OUT_PER_GROUP_FEW_IN:
        return False
    if in_per_group <= _UNFOLD_MAX_IN:
        return True
    return positions <= _UNFOLD_MAX_POSITIONS and out_per_group >= _UNFOLD_MIN_OUT_PER_GROUP


def per_example_weight_grads(
    x: Tensor, g: Tensor, spec: ConvSpec, weight_shape: tuple[int, ...]
) -> Tensor:
    """Per-example weight gradients ``(B, *weight_shape)`` of one convolution.

    Args:
        x: input ``(B, C_in, *S)`` (already right-padded for asymmetric 'same').
        g: output gradient ``(B, C_out, *S_out)``.
        spec: the convolution geometry.
        weight_shape: ``(C_out, C_in/groups, *kernel)``.

    Returns:
        ``G`` with ``G[i]`` the weight gradient of example ``i``.
    """
    b, c_in = x.shape[:2]
    c_out, groups = g.shape[1], spec.groups
    if b == 0:
        return g.new_zeros((0, *weight_shape))
    positions = math.prod(g.shape[2:])
    if _use_unfold(positions, c_out // groups, math.prod(weight_shape[1:])):
        a = patches(x, spec).view(b * groups, -1, positions)
        gk = g.reshape(b * groups, c_out // groups, positions)
        return torch.bmm(gk, a.transpose(1, 2)).view(b, *weight_shape)
    # One convolution whose groups are (example, group): its weight gradient
    # is every example's weight gradient, stacked along the output channels.
    xb = x.reshape(1, b * c_in, *x.shape[2:])
    gb = g.reshape(1, b * c_out, *g.shape[2:])
    stacked = spec.weight_grad(xb, gb, (b * weight_shape[0], *weight_shape[1:]), b * groups)
    return stacked.view(b, *weight_shape)


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
                # float64 sums, block by block: no (B, |w|) float64 copy
                sq, k = sq_norms_f64(self.grads.flatten(1))
                self._sq = sq.mul_(1.0 + gamma(k, U64))
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
        grads = self.instantiate()
        sq, k = sq_norms_f64(grads.flatten(1))
        del grads
        mass = factor_mass(x, g, self.spec, self.per)
        theta = _instantiation_error(self.terms, compute_dtype(x, g), x.device)
        root = sq.mul_(1.0 + gamma(k, U64)).sqrt_().add_(mass, alpha=theta)
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
