"""Schedules of the noise multiplier σ and the clipping threshold C, step by step.

A schedule is any callable from the number of steps taken to the value for
the next step (``schedule(0)`` is the first step's). The optimizer reads it
before each step and sets the value through the one place each lives
(:meth:`DPOptimizer.set_noise_multiplier`, :meth:`DPOptimizer.set_max_grad_norm`),
so the noise, the sensitivity and the accountant always agree. Two common
ones are here; any ``lambda step: ...`` works too.

Example:
    >>> ExponentialSchedule(2.0, gamma=0.5)(3)
    0.25
    >>> StepSchedule(1.0, step_size=10, gamma=0.1)(25)
    0.010000000000000002
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swiftdp.errors import InvalidArgumentError

__all__ = ["ExponentialSchedule", "Schedule", "StepSchedule", "check_planned_schedule",
           "schedule_value"]

Schedule = Callable[[int], float]
"""The value for the step after ``steps`` steps were taken."""


@dataclass(frozen=True)
class ExponentialSchedule:
    """``initial · gamma ** step`` (Opacus's ExponentialNoise), floored at ``minimum``."""

    initial: float
    gamma: float
    minimum: float = 0.0

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.initial * self.gamma ** step)


@dataclass(frozen=True)
class StepSchedule:
    """``initial · gamma ** (step // step_size)`` (Opacus's StepNoise)."""

    initial: float
    step_size: int
    gamma: float

    def __call__(self, step: int) -> float:
        return self.initial * self.gamma ** (step // self.step_size)


def schedule_value(schedule: Schedule, step: int, name: str, *, allow_zero: bool) -> float:
    """``schedule(step)``, checked: a finite number, > 0 (or ≥ 0 with ``allow_zero``).

    Raises:
        InvalidArgumentError: naming the schedule, the step and the value.
    """
    value = schedule(step)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise InvalidArgumentError(
            f"{name} returned {value!r} for step {step}; it must return a finite number "
            f"{'>= 0' if allow_zero else '> 0'} for every step.")
    return float(value)


def check_planned_schedule(schedule: Schedule, steps: int, privacy: Any) -> float:
    """Refuse a noise schedule whose planned ``steps`` would spend more than the target ε.

    Args:
        schedule: σ per step.
        steps: the planned number of steps.
        privacy: the run's :class:`~swiftdp.settings.PrivacySettings` (q, δ,
            accountant, target ε).

    Returns:
        The ε of the planned schedule.

    Raises:
        InvalidArgumentError: the schedule overshoots the target (the message
            gives both).
    """
    from swiftdp.accounting import PrivacyAccountant

    segments: list[tuple[float, int]] = []
    for t in range(steps):
        sigma = schedule_value(schedule, t, "noise_schedule", allow_zero=True)
        if segments and segments[-1][0] == sigma:
            segments[-1] = (sigma, segments[-1][1] + 1)
        else:
            segments.append((sigma, 1))

    def epsilon(mechanism: str) -> float:
        accountant = PrivacyAccountant(mechanism)
        for sigma, n in segments:
            accountant.step(sigma, privacy.sample_rate, n)
        return float(accountant.epsilon(privacy.delta))

    # RDP first: fast, and an upper bound of the tighter PLD/PRV ε (whose
    # composition of many different σ can take minutes); within the target it decides.
    eps = epsilon("rdp")
    if privacy.accountant != "rdp" and (privacy.target_epsilon is None
                                        or eps > privacy.target_epsilon):
        eps = epsilon(privacy.accountant)
    if privacy.target_epsilon is not None and eps > privacy.target_epsilon:
        raise InvalidArgumentError(
            f"noise_schedule would spend epsilon={eps:.4f} over the {steps} planned steps, more "
            f"than target_epsilon={privacy.target_epsilon} (delta={privacy.delta}). Raise the "
            "schedule's σ, plan fewer steps, or raise the target.")
    return eps
