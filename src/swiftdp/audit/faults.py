"""Test-only fault injections: known privacy bugs, to check that an audit can see them.

Each is a context manager that breaks one step of the DP-SGD pipeline while
it is active (by patching swiftdp's own functions; nothing outside swiftdp is
touched), so anyone can check the power of an audit on their own
configuration::

    with faults.noise_scaled(0.3):
        result = audit.one_run(...)
    assert result.epsilon_lower_bound > result.epsilon_claimed   # the audit caught it

Never use them in training: every one of them releases more than the
accountant reports.

* :func:`clipping_disabled` — every clip factor 1: examples enter the sum unclipped.
* :func:`noise_scaled` — the noise's std multiplied by ``factor`` (0.3: too little).
* :func:`noise_per_physical_batch` — each of a logical batch's ``k`` physical
  chunks draws ``1/k`` of the noise std, as a loop that scales its noise to
  the chunk's share would: the step's noise std is ``σC/√k``, not ``σC``.
* :func:`realised_batch_division` — the noised sum divided by the realised
  batch size instead of the expected ``q·N``: a count leak, seen by
  :func:`swiftdp.audit.many_runs` (``score="scale"``), not by one run.
* :func:`sampling_rate_scaled` — examples sampled at ``factor · q`` while the
  accountant is told ``q``.
* :func:`sigma_unreported` — σ multiplied by ``factor`` for the noise from
  step ``after`` on, the accountant still recording the old σ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch import Tensor

__all__ = [
    "clipping_disabled", "noise_per_physical_batch", "noise_scaled", "realised_batch_division",
    "sampling_rate_scaled", "sigma_unreported",
]


@contextlib.contextmanager
def clipping_disabled() -> Iterator[None]:
    """Every per-example clip factor is 1: gradients enter the sum unclipped."""
    from swiftdp.clipping import early, nanobatch, step

    def ones(norms: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.ones_like(norms)

    with contextlib.ExitStack() as stack:
        for module in (step, early, nanobatch):
            stack.enter_context(mock.patch.object(module, "clip_factors", ones))
        yield


@contextlib.contextmanager
def noise_scaled(factor: float) -> Iterator[None]:
    """The noise's standard deviation is ``factor`` times what the accountant assumes."""
    from swiftdp.optim import optimizer

    real = optimizer.add_gaussian_noise

    def scaled(params: Any, std: float, generator: torch.Generator) -> None:
        real(params, std * factor, generator)

    with mock.patch.object(optimizer, "add_gaussian_noise", scaled):
        yield


@contextlib.contextmanager
def noise_per_physical_batch() -> Iterator[None]:
    """Each of the ``k`` physical chunks of a logical batch adds noise of std ``σC/k``.

    Summed over the chunks the step's noise has std ``σC/√k``: the logical
    step is noised as if it were ``k`` steps each with its share.
    """
    from swiftdp.optim import optimizer

    real_receive = optimizer.DPOptimizer.receive
    real_noise = optimizer.add_gaussian_noise

    def receive(self: Any, result: Any) -> None:
        k = self.step_state.current.chunks
        std = self.settings.noise_std() / k
        for _, s in result.sums:
            s.add_(torch.randn(s.shape, generator=self.generator, dtype=s.dtype), alpha=std)
        real_receive(self, result)

    def no_step_noise(params: Any, std: float, generator: torch.Generator) -> None:
        real_noise(params, 0.0, generator)  # the step's own noise: already added per chunk

    with mock.patch.object(optimizer.DPOptimizer, "receive", receive), \
            mock.patch.object(optimizer, "add_gaussian_noise", no_step_noise):
        yield


@contextlib.contextmanager
def realised_batch_division() -> Iterator[None]:
    """The noised sum is divided by the realised batch size, not the expected ``q·N``."""
    from swiftdp.optim import optimizer

    real_step = optimizer.DPOptimizer.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        realised = max(int(self._examples), 1)
        settings = self.settings
        expected = settings.expected_batch_size
        object.__setattr__(settings, "expected_batch_size", float(realised))
        try:
            return real_step(self, *args, **kwargs)
        finally:
            object.__setattr__(settings, "expected_batch_size", expected)

    with mock.patch.object(optimizer.DPOptimizer, "step", step):
        yield


@contextlib.contextmanager
def sampling_rate_scaled(factor: float) -> Iterator[None]:
    """Poisson sampling at ``min(1, factor·q)`` while the accountant is told ``q``."""
    from swiftdp.sampling import poisson

    real = poisson.PoissonBatchSampler._draw_batches

    def draw(self: Any, iteration: int) -> Iterator[list[int]]:
        q = self.sample_rate
        self.sample_rate = min(1.0, q * factor)
        try:
            yield from real(self, iteration)
        finally:
            self.sample_rate = q

    with mock.patch.object(poisson.PoissonBatchSampler, "_draw_batches", draw):
        yield


@contextlib.contextmanager
def sigma_unreported(factor: float, after: int = 0) -> Iterator[None]:
    """From step ``after`` on the noise uses ``factor · σ``; the accountant keeps the old σ."""
    from swiftdp.optim import optimizer

    real = optimizer.add_gaussian_noise
    taken = {"steps": 0}
    real_step = optimizer.DPOptimizer.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        taken["steps"] = int(self.steps_taken)
        return real_step(self, *args, **kwargs)

    def noise(params: Any, std: float, generator: torch.Generator) -> None:
        real(params, std * (factor if taken["steps"] >= after else 1.0), generator)

    with mock.patch.object(optimizer.DPOptimizer, "step", step), \
            mock.patch.object(optimizer, "add_gaussian_noise", noise):
        yield
