"""Convolution geometry and the kernels that form per-example weight gradients.

:class:`ConvSpec` makes a call's geometry explicit (``'same'`` padding
resolved), :func:`patches` unfolds an input into the rows ghost norms and
unfold instantiation read, and :func:`per_example_weight_grads` instantiates
``(B, *weight.shape)`` by whichever kernel is faster for the shape
(:func:`_use_unfold`, measured on CPU). The rule and its contribution are
:mod:`swiftdp.layers.conv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
