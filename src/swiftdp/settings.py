"""The settings of a private training run, split by what they change.

:class:`PrivacySettings` holds everything that changes the privacy guarantee
(σ, C, δ, sampling, clipping style, accountant); :class:`SpeedSettings` what
only changes speed and memory (mode, physical batch, cost objective). The
sensitivity of the clipped sum is computed in one place:
:meth:`PrivacySettings.sensitivity`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from swiftdp.clipping.clip_fns import ClippingStyle, sensitivity


@dataclass(frozen=True)
class PrivacySettings:
    """Settings that determine the privacy guarantee.

    Attributes:
        noise_multiplier: σ; the noise std per coordinate is σ · sensitivity.
        max_grad_norm: the clipping threshold C.
        delta: the target δ.
        sample_rate: q, each example's probability of joining a logical batch.
        expected_batch_size: q · N, the divisor of every noisy sum.
        clipping: the clip function.
        poisson_sampling: whether batches are Poisson-sampled (the accounting
            assumes it; ``False`` is for debugging only and says so).
        accountant: ``"pld"``, ``"rdp"`` or ``"prv"``.
        target_epsilon: the budget; a step that would exceed it is refused.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float
    expected_batch_size: float
    clipping: ClippingStyle = "flat"
    poisson_sampling: bool = True
    accountant: str = "pld"
    target_epsilon: float | None = None

    def sensitivity(self) -> float:
        """L2 sensitivity of one logical step's clipped sum."""
        return sensitivity(self.max_grad_norm, self.clipping)

    def noise_std(self) -> float:
        """Std of the Gaussian noise added to each coordinate of the clipped sum."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.sensitivity()

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
        cost_objective: what the per-layer cost model minimises.
    """

    mode: str = "bk"
    max_physical_batch_size: int | None = None
    cost_objective: str = "time"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)
