"""The settings of a private training run, split by what they change.

:class:`PrivacySettings` holds everything that changes the privacy guarantee
(σ, C, δ, sampling, clipping style, accountant); :class:`SpeedSettings` what
only changes speed and memory (mode, physical batch, cost objective). The
sensitivity of the clipped sum is computed in one place:
:meth:`PrivacySettings.sensitivity`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from swiftdp.clipping.clip_fns import ClippingStyle, Thresholds, sensitivity


@dataclass(frozen=True)
class AdaptiveClipping:
    """Clipping thresholds that follow a quantile of the per-example norms (Andrew et al. 2021).

    After each step, every threshold (one ``C``, or each group's ``C_k``)
    moves geometrically towards the ``target_quantile`` of its per-example
    gradient norms: ``C ← C · exp(−learning_rate · (b̃ − target_quantile))``,
    where ``b̃`` is the noised fraction of the batch's examples whose norm was
    at most ``C``: ``b̃ = (Σ_i (b_i − ½) + N(0, count_noise²)) / (q·N) + ½``.
    The counts are released too, so they are accounted: with ``K`` groups an
    example moves the ``K`` centred counts by ``√K / 2`` at most, and the
    gradient's noise multiplier ``σ_g`` is lowered so that the two together
    are exactly one Gaussian mechanism of multiplier ``σ`` (the one the
    accountant records): ``σ⁻² = σ_g⁻² + (2·count_noise / √K)⁻²``.

    Attributes:
        target_quantile: the quantile γ of the per-example norms to track, in (0, 1).
        learning_rate: η, the geometric step size (> 0).
        count_noise: the std of the noise on each count (> 0); ``None``: the
            expected batch size ``q·N`` / 20 (Andrew et al.'s choice), or
            ``σ·√K`` if that is more (a small batch: the gradient's noise
            multiplier is then ``σ/√(3/4) ≈ 1.15·σ``).

    References:
        Andrew, Thakkar, McMahan, Ramaswamy. Differentially private learning
        with adaptive clipping. NeurIPS 2021.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None


@dataclass(frozen=True)
class PrivacySettings:
    """Settings that determine the privacy guarantee.

    Attributes:
        noise_multiplier: σ; the noise std per coordinate is σ · sensitivity.
        max_grad_norm: the clipping threshold C; or, for group-wise clipping,
            the groups ``((module-name prefix, C_k), ...)``, each example's
            gradient restricted to group ``k`` clipped to ``C_k`` on its own;
            for a pipeline stage, every stage's ``(("stage 0", C_0), ...)``.
        delta: the target δ.
        sample_rate: q, each example's probability of joining a logical batch.
        expected_batch_size: q · N, the divisor of every noisy sum.
        clipping: the clip function.
        poisson_sampling: whether batches are Poisson-sampled (the accounting
            assumes it; ``False`` is for debugging only and says so).
        accountant: ``"pld"``, ``"rdp"`` or ``"prv"``.
        target_epsilon: the budget; a step that would exceed it is refused.
        pipeline_stage: this process' stage of a pipeline (:mod:`swiftdp.pipeline`):
            it clips its own parameters to its own ``C_k`` and adds the whole
            noise ``N(0, σ²S²)`` to them; ``None`` outside a pipeline.
        adaptive: adaptive clipping (its ``count_noise`` resolved), or ``None``.
    """

    noise_multiplier: float
    max_grad_norm: Thresholds
    delta: float
    sample_rate: float
    expected_batch_size: float
    clipping: ClippingStyle = "flat"
    poisson_sampling: bool = True
    accountant: str = "pld"
    target_epsilon: float | None = None
    pipeline_stage: int | None = None
    adaptive: AdaptiveClipping | None = None

    def sensitivity(self) -> float:
        """L2 sensitivity of one logical step's clipped sum: ``C``, or ``√Σ_k C_k²`` for groups.

        For a pipeline stage it is that of the whole model's clipped sum (all
        stages' groups): each stage adds ``N(0, σ²S²)`` to its own part.
        """
        return sensitivity(self.max_grad_norm, self.clipping)

    def clip_thresholds(self) -> Thresholds:
        """What this process' engine clips to: ``max_grad_norm``, or a pipeline stage's own ``C_k``."""
        if self.pipeline_stage is None or not isinstance(self.max_grad_norm, tuple):
            return self.max_grad_norm
        return self.max_grad_norm[self.pipeline_stage][1]

    def groups(self) -> int:
        """The number of thresholds (1 for one ``C``, ``K`` for groups)."""
        return len(self.max_grad_norm) if isinstance(self.max_grad_norm, tuple) else 1

    def gradient_noise_multiplier(self) -> float:
        """σ_g, the multiplier of the gradient's noise: σ, or less with adaptive clipping.

        With adaptive clipping the noised counts are part of the same
        Gaussian mechanism: ``σ_g = (σ⁻² − (2·count_noise/√K)⁻²)^(−1/2)``
        (:class:`AdaptiveClipping`); :func:`check_adaptive` made sure it exists.
        """
        sigma, a = self.noise_multiplier, self.adaptive
        if a is None or sigma == 0:
            return sigma
        assert a.count_noise is not None
        count_multiplier = 2 * a.count_noise / math.sqrt(self.groups())
        return float((sigma ** -2 - count_multiplier ** -2) ** -0.5)

    def noise_std(self) -> float:
        """Std of the Gaussian noise added to each coordinate of the clipped sum."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.gradient_noise_multiplier() * self.sensitivity()

    def count_noise_std(self) -> float:
        """Std of the noise on each clipped count of adaptive clipping (0 without it or σ = 0)."""
        if self.adaptive is None or self.noise_multiplier == 0:
            return 0.0
        assert self.adaptive.count_noise is not None
        return float(self.adaptive.count_noise)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints and run folders)."""
        return asdict(self)


@dataclass(frozen=True)
class SpeedSettings:
    """Settings that change speed and memory only, never the guarantee.

    Attributes:
        mode: clipping engine mode (``"bk"``, ``"ghost"``, ``"per_sample"``, ``"nanobatch"``).
        max_physical_batch_size: largest chunk run through the model at once
            (``None``: the whole logical batch).
        cost_objective: what the per-layer cost model minimises (``"time"``,
            ``"memory"``), or ``"ghost"`` / ``"instantiate"`` to force one side
            for every factored layer (see :mod:`swiftdp.clipping.cost`).
    """

    mode: str = "bk"
    max_physical_batch_size: int | None = None
    cost_objective: str = "time"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)
