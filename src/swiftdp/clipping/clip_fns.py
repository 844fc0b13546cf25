"""Clip functions: per-example factors ``c_i`` from per-example gradient norms."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from swiftdp.clipping.deferred import PendingCounts, nonfinite_message
from swiftdp.errors import NonFiniteGradientWarning

ClippingStyle = Literal["flat", "automatic"]
CLIPPING_STYLES: tuple[str, ...] = ("flat", "automatic")

GroupThresholds = tuple[tuple[str, float], ...]
"""Group-wise thresholds ``((name, C_k), ...)``, in order: group ``k`` is clipped to ``C_k``."""

Thresholds = float | GroupThresholds
"""One threshold ``C`` for the whole gradient, or one per group of parameters."""

FLAT_EPS = 1e-6
AUTOMATIC_GAMMA = 0.01

# float32's smallest normal number: a clip weight below it is cast with an
# absolute rounding (up to 2⁻¹⁵⁰) that the clipped sum's bounds do not carry.
_TINY = float(torch.finfo(torch.float32).tiny)


def unweightable_as_inf(norms: Tensor, max_grad_norm: float, scale: float = 1.0,
                        style: ClippingStyle = "flat") -> Tensor:
    """``norms`` with ``inf`` where the example's weight in the clipped sum would be subnormal.

    The weight ``scale · C / (‖g_i‖ + ε)`` is cast to the compute dtype
    (float32 at least) before it multiplies the example's gradient; below
    float32's smallest normal number the cast rounds by up to ``2⁻¹⁵⁰``
    absolutely, which a gradient this large (``‖g_i‖ > C · 1e37``) magnifies
    past ``C`` (found in review: ``1.02 C`` at ``C = 1e-5``). Such an example
    is dropped like a non-finite one: the callers form their non-finite mask
    from the result. A factor 2 covers the rounding of the weight itself.

    Args:
        norms: per-example gradient norms (float64), any shape.
        max_grad_norm: the threshold ``C`` they are clipped to.
        scale: what the clip factor is multiplied by to give the weight.
        style: the clipping style (its ``ε``).
    """
    eps = FLAT_EPS if style == "flat" else AUTOMATIC_GAMMA
    return norms.masked_fill(norms + eps > max_grad_norm * scale / (2.0 * _TINY), math.inf)


def clip_factors(
    norms: Tensor,
    max_grad_norm: float,
    style: ClippingStyle = "flat",
    *,
    warn_nonfinite: bool = True,
) -> Tensor:
    """Per-example clip factors; an example whose norm is not finite gets factor 0.

    Args:
        norms: per-example gradient norms ``‖g_i‖``, shape ``(B,)``.
        max_grad_norm: the clipping threshold ``C``.
        style: ``"flat"``: ``c_i = min(1, C / (‖g_i‖ + 1e-6))``;
            ``"automatic"``: ``c_i = C / (‖g_i‖ + 0.01)`` (normalisation).
        warn_nonfinite: check for non-finite norms (one host synchronisation)
            and warn with their count; a caller that already called
            :func:`nonfinite_examples` for these norms passes ``False``.

    Returns:
        ``c`` of shape ``(B,)`` (norms are >= 0, NaN or inf). In both styles
        ``‖c_i g_i‖ <= C``, so the sensitivity of the clipped sum to adding or
        removing one example is ``C``. ``c_i = 0`` where ``‖g_i‖`` is NaN or inf: such an example
        (a NaN or overflowing input) must be left out of the clipped sum
        exactly, which :func:`~swiftdp.clipping.contributions.param_weighted_sum`
        does (``0 · inf`` would be NaN and reveal the example).

    Warns:
        NonFiniteGradientWarning: some norms were not finite.

    References:
        Abadi et al. Deep learning with differential privacy. CCS 2016.
        Bu et al. Automatic clipping: differentially private deep learning
        made easier and stronger. NeurIPS 2023.
    """
    if style not in CLIPPING_STYLES:
        raise ValueError(f"Expected clipping in {CLIPPING_STYLES}, got {style!r}.")
    if warn_nonfinite:
        nonfinite_examples(norms)
    if norms.requires_grad:  # differentiable path (the in-place one below is not)
        if style == "flat":
            c = (max_grad_norm / (norms + FLAT_EPS)).clamp(max=1.0)
        else:
            c = max_grad_norm / (norms + AUTOMATIC_GAMMA)
        return torch.where(torch.isfinite(norms), c, 0.0)
    # C / (‖g‖ + ε) as torch computes it (a reciprocal, then the product), in place.
    c = (norms + (FLAT_EPS if style == "flat" else AUTOMATIC_GAMMA)).reciprocal_().mul_(max_grad_norm)
    if style == "flat":
        c.clamp_(max=1.0)
    # A norm of +inf already gives 0 (C / inf) and NaN gives NaN, set to 0 here:
    # the same factors as masking the non-finite norms, for any norms >= 0.
    return c.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def nonfinite_examples(norms: Tensor, *, warn: bool = True,
                       pending: PendingCounts | None = None) -> Tensor | None:
    """The examples whose gradient norm is NaN or inf, to be dropped from this step.

    One host synchronisation (the sum of the norms, finite when all are); the
    mask and the count are formed only when it is not. With ``pending`` (a
    step run without host synchronisation, :mod:`swiftdp.clipping.deferred`)
    nothing is read: the mask is returned every time and the count queued for
    a later warning.

    Args:
        norms: per-example gradient norms, shape ``(B,)``.
        warn: emit :class:`~swiftdp.errors.NonFiniteGradientWarning` with the count.
        pending: where a sync-free step queues its count, or ``None``.

    Returns:
        A ``(B,)`` bool mask (always, with ``pending``), or ``None`` when every
        norm is finite.
    """
    if pending is not None:
        bad = ~torch.isfinite(norms)
        pending.poll()
        if warn:
            pending.push(bad)
        return bad
    # A finite sum proves every norm finite (NaN and inf propagate): one
    # reduction in the common case; the mask only when something is off.
    if math.isfinite(float(norms.sum())):
        return None
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):  # finite norms whose sum overflowed
        return None
    if warn:
        k, n = int(bad.sum()), int(bad.numel())
        warnings.warn(NonFiniteGradientWarning(nonfinite_message(k, n)), stacklevel=3)
    return bad


def sensitivity(max_grad_norm: Thresholds, style: ClippingStyle = "flat") -> float:
    """L2 sensitivity of the clipped sum under add/remove-one adjacency.

    Args:
        max_grad_norm: the clipping threshold ``C``, or the group thresholds
            ``((name, C_k), ...)`` of group-wise clipping (each example's
            gradient restricted to group ``k`` clipped to ``C_k`` on its own).
        style: the clip function (both styles bound each clipped part by its threshold).

    Returns:
        ``C``, or ``√Σ_k C_k²`` for groups: the parts of one example are
        orthogonal (disjoint parameters), so its clipped gradient has norm at
        most ``√Σ_k C_k²``. The Gaussian noise std is ``noise_multiplier * sensitivity``.

    References:
        He et al. Exploring the limits of differentially private deep learning
        with group-wise clipping. ICLR 2023.
    """
    del style
    if isinstance(max_grad_norm, tuple):
        return math.sqrt(math.fsum(float(c) ** 2 for _, c in max_grad_norm))
    return float(max_grad_norm)


def group_thresholds(max_grad_norm: Thresholds) -> tuple[float, ...] | None:
    """The thresholds ``(C_1, ..., C_K)`` of group-wise clipping, or ``None`` for one ``C``."""
    if isinstance(max_grad_norm, tuple):
        return tuple(float(c) for _, c in max_grad_norm)
    return None
