"""The thresholds of a DP optimizer: set, scheduled or adapted between steps.

One place changes ``C`` during a run (:meth:`ThresholdControl._set_thresholds`):
the settings (which the noise reads) and the engine (which clips) together;
the optimizer refuses clipped sums made with any other threshold
(:meth:`DPOptimizer.receive`). Schedules of σ and ``C`` are applied after each
step for the next one, and adaptive clipping (Andrew et al. 2021) sets the
next ``C`` from the noised counts released with the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from swiftdp import distributed
from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.clipping.groups import check_clip_thresholds
from swiftdp.errors import InvalidArgumentError, StepStructureError
from swiftdp.optim.noise import add_gaussian_noise
from swiftdp.optim.schedules import Schedule, schedule_value
from swiftdp.settings import PrivacySettings

__all__ = ["ThresholdControl"]


class _Counts:
    """Adaptive clipping's centred counts ``(K,)``, noised and reduced like a clipped sum."""

    __slots__ = ("dtype", "grad", "shape")

    def __init__(self, counts: Tensor) -> None:
        self.grad: Tensor = counts
        self.dtype = counts.dtype
        self.shape = counts.shape


class ThresholdControl:
    """The threshold and schedule methods of :class:`~swiftdp.optim.optimizer.DPOptimizer`."""

    _settings: PrivacySettings
    _logical: int | None
    _within: Tensor | None
    _examples: int
    _engine_thresholds: Callable[[Thresholds], None]
    _noise_schedule: Schedule | None
    _clip_schedule: Schedule | None
    _initial_thresholds: Thresholds
    steps_taken: int
    generator: torch.Generator
    ranks: distributed.Ranks | None

    def set_noise_multiplier(self, noise_multiplier: float) -> None:  # (DPOptimizer's)
        raise NotImplementedError

    def set_max_grad_norm(self, max_grad_norm: float | Any) -> None:
        """Change the clipping threshold from the next step on; clipping and noise both follow.

        Args:
            max_grad_norm: the new ``C``; with groups, ``{prefix: C_k}`` for
                the same groups; on a pipeline stage, the list ``[C_0, ...]``.

        Raises:
            InvalidArgumentError: a threshold that is not positive and finite,
                other groups, or a run whose thresholds adapt by themselves.
            StepStructureError: a backward of the current logical batch already
                clipped to the old threshold (change it between steps).
        """
        if self._settings.adaptive is not None:
            raise InvalidArgumentError(
                "set_max_grad_norm on a run with adaptive clipping: its thresholds follow the "
                "norms' quantile by themselves. Use fixed thresholds to set them.")
        if self._logical is not None:
            raise StepStructureError(
                "set_max_grad_norm was called after a backward of the current logical batch: "
                f"its examples were clipped to {self._settings.max_grad_norm!r} and the noise "
                "must match. Change the threshold between optimizer.step() and the next "
                "batch's backward.")
        self._set_thresholds(check_clip_thresholds(max_grad_norm, self._settings.pipeline_stage))

    def _set_thresholds(self, new: Thresholds) -> None:
        # The one way C changes (set_max_grad_norm, schedules, adaptive clipping,
        # load_state_dict): never while clipped sums wait for their noise, nor
        # during a backward (a hook: its examples may be clipped to the old C).
        if self._logical is not None or torch._C._current_graph_task_id() != -1:
            raise StepStructureError(
                f"The clipping threshold cannot change now (to {new!r}): clipped sums of the "
                f"current logical batch, clipped to {self._settings.max_grad_norm!r}, wait for "
                "their noise, or a backward pass is running. Change it between "
                "optimizer.step() and the next batch's forward.")
        old = self._settings.max_grad_norm
        if isinstance(old, tuple) != isinstance(new, tuple) or (
                isinstance(old, tuple) and sorted(n for n, _ in old) != sorted(
                    n for n, _ in new)):  # type: ignore[union-attr]
            raise InvalidArgumentError(
                f"The new threshold {new!r} does not have the structure of this run's "
                f"{old!r}: keep one C, or the same groups, and change the values only.")
        if isinstance(old, tuple):
            values = dict(new)  # type: ignore[arg-type]
            new = tuple((n, values[n]) for n, _ in old)
        settings = dataclasses.replace(self._settings, max_grad_norm=new)
        object.__setattr__(self, "_settings", settings)
        self._engine_thresholds(settings.clip_thresholds())

    def configure(self, engine_thresholds: Callable[[Thresholds], None],
                  noise_schedule: Schedule | None = None,
                  clip_schedule: Schedule | None = None) -> None:
        """Connect the clipping engine's threshold and the schedules (``make_private`` does).

        Args:
            engine_thresholds: sets the threshold the engine clips to.
            noise_schedule: σ for the step after ``n`` steps taken, or ``None``.
            clip_schedule: ``C`` for the step after ``n`` steps taken (one
                threshold only), or ``None``.
        """
        object.__setattr__(self, "_engine_thresholds", engine_thresholds)
        object.__setattr__(self, "_noise_schedule", noise_schedule)
        object.__setattr__(self, "_clip_schedule", clip_schedule)
        self._apply_schedules()

    def _apply_schedules(self) -> None:
        """Set σ and C of the next step from the schedules (after ``steps_taken`` steps)."""
        t = self.steps_taken
        if self._noise_schedule is not None:
            self.set_noise_multiplier(
                schedule_value(self._noise_schedule, t, "noise_schedule", allow_zero=True))
        if self._clip_schedule is not None:
            self._set_thresholds(
                schedule_value(self._clip_schedule, t, "clip_schedule", allow_zero=False))

    def _noised_fractions(self, world: int) -> list[float]:
        """Adaptive clipping: ``b̃_k``, each group's noised fraction of examples within ``C_k``.

        The centred count ``Σ_i (b_i − ½)`` gets ``N(0, count_noise²)`` (each
        rank its share, summed by an all-reduce), then ``b̃ = count / (q·N) + ½``
        (:class:`~swiftdp.settings.AdaptiveClipping`).
        """
        s = self._settings
        k = s.groups()
        within = self._within if self._within is not None else torch.zeros(k, dtype=torch.float64)
        count = _Counts(within.double() - self._examples / 2)
        std = s.count_noise_std()
        if world > 1:
            assert self.ranks is not None
            with distributed.step_collective():
                distributed.noisy_all_reduce(
                    [count], lambda b: add_gaussian_noise(b, std / math.sqrt(world),
                                                          self.generator))
        else:
            add_gaussian_noise([count], std, self.generator)
        return [float(c) / s.expected_batch_size + 0.5 for c in count.grad]
