"""Clip functions: per-example factors ``c_i`` from per-example gradient norms."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

ClippingStyle = Literal["flat", "automatic"]
CLIPPING_STYLES: tuple[str, ...] = ("flat", "automatic")

FLAT_EPS = 1e-6
AUTOMATIC_GAMMA = 0.01


def clip_factors(norms: Tensor, max_grad_norm: float, style: ClippingStyle = "flat") -> Tensor:
    """Per-example clip factors.

    Args:
        norms: per-example gradient norms ``‖g_i‖``, shape ``(B,)``.
        max_grad_norm: the clipping threshold ``C``.
        style: ``"flat"``: ``c_i = min(1, C / (‖g_i‖ + 1e-6))``;
            ``"automatic"``: ``c_i = C / (‖g_i‖ + 0.01)`` (normalisation).

    Returns:
        ``c`` of shape ``(B,)``. In both styles ``‖c_i g_i‖ <= C``, so the
        sensitivity of the clipped sum to adding or removing one example is
        ``C``.

    References:
        Abadi et al. Deep learning with differential privacy. CCS 2016.
        Bu et al. Automatic clipping: differentially private deep learning
        made easier and stronger. NeurIPS 2023.
    """
    if style == "flat":
        return (max_grad_norm / (norms + FLAT_EPS)).clamp(max=1.0)
    if style == "automatic":
        return max_grad_norm / (norms + AUTOMATIC_GAMMA)
    raise ValueError(f"Expected clipping in {CLIPPING_STYLES}, got {style!r}.")


def sensitivity(max_grad_norm: float, style: ClippingStyle = "flat") -> float:
    """L2 sensitivity of the clipped sum under add/remove-one adjacency.

    Args:
        max_grad_norm: the clipping threshold ``C``.
        style: the clip function (both styles bound each clipped example by C).

    Returns:
        The sensitivity; the Gaussian noise std is ``noise_multiplier * sensitivity``.
    """
    del style
    return float(max_grad_norm)


