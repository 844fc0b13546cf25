"""Adaptive clipping (Andrew et al. 2021): thresholds that follow a quantile of the norms.

:class:`~swiftdp.settings.AdaptiveClipping` holds the parameters and the
privacy argument; here are its checks (:func:`resolve_adaptive`) and its
update rule (:func:`updated_thresholds`), which the optimizer runs after each
step on the noised counts it released with the gradient.
"""

from __future__ import annotations

import math

from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.errors import InvalidArgumentError
from swiftdp.settings import AdaptiveClipping

__all__ = ["resolve_adaptive", "updated_thresholds"]


def _number(value: object, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low < float(value) < high):
        bounds = f"in ({low:g}, {high:g})" if high < math.inf else f"> {low:g} and finite"
        raise InvalidArgumentError(
            f"Expected AdaptiveClipping.{name} {bounds}, got {value!r}.")
    return float(value)


def resolve_adaptive(adaptive: AdaptiveClipping | None, *, noise_multiplier: float,
                     expected_batch_size: float, groups: int, clipping: str,
                     pipeline: bool) -> AdaptiveClipping | None:
    """Check adaptive clipping and fill in its count noise (default ``max(q·N/20, σ·√K)``).

    Args:
        adaptive: the user's settings, or ``None``.
        noise_multiplier: σ, the multiplier the accountant records.
        expected_batch_size: ``q·N``.
        groups: the number of thresholds ``K``.
        clipping: the clip function (adaptive needs ``"flat"``).
        pipeline: whether this is a pipeline stage (not supported).

    Returns:
        The settings with ``count_noise`` set, or ``None``.

    Raises:
        InvalidArgumentError: a parameter out of range, automatic clipping, a
            pipeline stage, or a count noise too small for σ (the counts alone
            would then spend more than the whole step may).
    """
    if adaptive is None:
        return None
    if not isinstance(adaptive, AdaptiveClipping):
        raise InvalidArgumentError(
            f"Expected adaptive_clipping=swiftdp.AdaptiveClipping(...), got {adaptive!r}.")
    if clipping != "flat":
        raise InvalidArgumentError(
            f"Adaptive clipping moves the threshold C of flat clipping; clipping={clipping!r} "
            "has no threshold to adapt. Use clipping='flat' with adaptive_clipping=.")
    if pipeline:
        raise InvalidArgumentError(
            "Adaptive clipping is not supported on pipeline stages (the stages would have to "
            "share their noised counts). Use fixed thresholds or a clip schedule.")
    gamma = _number(adaptive.target_quantile, "target_quantile", 0.0, 1.0)
    eta = _number(adaptive.learning_rate, "learning_rate", 0.0)
    needed = noise_multiplier * math.sqrt(groups) / 2
    # Andrew et al.'s q·N/20 suits large batches; a small one gets σ·√K, which
    # leaves the gradient σ_g = σ/√(3/4) ≈ 1.15·σ.
    count_noise = (max(expected_batch_size / 20, 2 * needed) if adaptive.count_noise is None
                   else _number(adaptive.count_noise, "count_noise", 0.0))
    if noise_multiplier > 0 and not count_noise > needed:
        raise InvalidArgumentError(
            f"AdaptiveClipping.count_noise={count_noise:g} is too small for "
            f"noise_multiplier={noise_multiplier:g} with {groups} threshold(s): the counts and "
            f"the gradient together are one Gaussian mechanism of multiplier σ, which needs "
            f"count_noise > σ·√K/2 = {needed:g} (σ_g⁻² = σ⁻² − (2·count_noise/√K)⁻²). Pass a "
            f"larger count_noise (Andrew et al. use q·N/20 = {expected_batch_size / 20:g}) or "
            "a larger batch.")
    return AdaptiveClipping(target_quantile=gamma, learning_rate=eta, count_noise=count_noise)


def updated_thresholds(thresholds: Thresholds, fractions: list[float],
                       adaptive: AdaptiveClipping) -> Thresholds:
    """The next step's thresholds: ``C_k · exp(−η (b̃_k − γ))`` for each group's noised fraction.

    The exponent is clipped to ±5 (a factor of at most e⁵ ≈ 148 per step): the
    noised fraction is unbounded, and an overflow or a C of 0 would stop the run.

    Args:
        thresholds: this step's ``C`` or ``((prefix, C_k), ...)``.
        fractions: ``b̃_k``, the noised fraction of examples at most ``C_k``, per group.
        adaptive: the resolved settings.

    Returns:
        The thresholds in the same structure.
    """
    gamma, eta = adaptive.target_quantile, adaptive.learning_rate

    def factor(b: float) -> float:
        # The noised fraction is unbounded: one step moves C by at most e^±_MAX_LOG_STEP
        # (never to 0 or inf), a function of the released count only.
        return math.exp(min(_MAX_LOG_STEP, max(-_MAX_LOG_STEP, -eta * (b - gamma))))

    if not isinstance(thresholds, tuple):
        return float(thresholds * factor(fractions[0]))
    return tuple((name, float(c * factor(b)))
                 for (name, c), b in zip(thresholds, fractions, strict=True))


_MAX_LOG_STEP = 5.0
