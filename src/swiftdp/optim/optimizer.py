"""A wrapper that turns any ``torch.optim`` optimizer into a DP-SGD step.

At the end of each *logical* step (all its physical chunks accumulated by the
clipping engine into ``p.grad`` as clipped sums), :meth:`DPOptimizer.step`:

1. asks the accountant what ε the step would bring and refuses it with
   :class:`~swiftdp.errors.PrivacyBudgetExceededError` before anything changes
   if that exceeds the target;
2. adds ``N(0, σ²C²)`` once to each trainable parameter's clipped sum;
3. divides by the fixed expected batch size ``q·N`` (never the realised size);
4. runs the wrapped optimizer's step (SGD, Adam, AdamW, ...; LR schedulers
   attached to the wrapped optimizer keep working);
5. records the step in the accountant.

References:
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from swiftdp.accounting import PrivacyAccountant
from swiftdp.api.config import PrivacySettings
from swiftdp.errors import PrivacyBudgetExceededError
from swiftdp.optim.noise import add_gaussian_noise


class StepState:
    """Shared between the data loader and the optimizer: where the logical step stands."""

    def __init__(self) -> None:
        self.is_last_chunk = True
        self.accumulating = False


class DPOptimizer(torch.optim.Optimizer):
    """Differentially private step around a ``torch.optim.Optimizer``.

    Args:
        optimizer: the wrapped optimizer (its param groups, state and LR
            schedulers are used as they are).
        params: the trainable parameters being privatised.
        settings: the privacy settings (σ, C, q, expected batch size, target).
        accountant: the accountant recording every step.
        generator: the noise generator.
        step_state: shared with the data loader for physical batching.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        settings: PrivacySettings,
        accountant: PrivacyAccountant,
        generator: torch.Generator,
        step_state: StepState | None = None,
    ) -> None:
        # Not calling Optimizer.__init__: parameter groups and state are the
        # wrapped optimizer's own (shared, not copied), so LR schedulers built
        # on either object act on the same learning rates.
        self.original_optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Any] = {}
        self._optimizer_step_post_hooks: dict[int, Any] = {}
        self.params = params
        self.settings = settings
        self.accountant = accountant
        self.generator = generator
        self.step_state = step_state or StepState()
        self.noise_multiplier = settings.noise_multiplier
        self.steps_taken = 0
        # Largest step count verified to stay within the budget for a history
        # made only of (noise_multiplier, sample_rate) steps: ε grows with the
        # number of steps, so any count up to it is within budget too.
        self._verified_steps = 0

    # Delegation so that the wrapper can be used where an optimizer is expected.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The wrapped optimizer's state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, except in the middle of a logical step (chunks accumulate)."""
        if self.step_state.accumulating:
            return
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def epsilon_after_next_step(self) -> float:
        """The ε that would be spent once the next step is taken."""
        s = self.settings
        return self.accountant.epsilon_after(self.noise_multiplier, s.sample_rate, 1, s.delta)

    def check_budget(self) -> None:
        """Raise if the next step would take ε past the target."""
        target = self.settings.target_epsilon
        if target is None:
            return
        upcoming = self.accountant.total_steps + 1
        homogeneous = self._homogeneous()
        if homogeneous and upcoming <= self._verified_steps:
            return
        eps = self.epsilon_after_next_step()
        if eps <= target:
            if homogeneous:
                self._verified_steps = upcoming
            return
        raise PrivacyBudgetExceededError(
            f"The next step would spend epsilon={eps:.4f} > target_epsilon={target} "
            f"(delta={self.settings.delta}) after {self.accountant.total_steps} steps. "
            "No parameter was changed. Stop training here, or start a new run with a "
            "larger target_epsilon, a larger noise_multiplier or fewer steps."
        )

    def _homogeneous(self) -> bool:
        q = self.settings.sample_rate
        return all(
            seg.noise_multiplier == self.noise_multiplier and seg.sample_rate == q
            for seg in self.accountant.history
        )

    def verify_budget_for(self, steps: int) -> float:
        """Check once that ``steps`` steps at the current σ stay within the target.

        Later budget checks up to that count are then free. Returns the ε of
        that many steps.
        """
        s = self.settings
        fresh = type(self.accountant)(self.accountant.mechanism)
        eps = fresh.epsilon_after(self.noise_multiplier, s.sample_rate, steps, s.delta)
        if s.target_epsilon is not None and eps <= s.target_epsilon and not self.accountant.history:
            self._verified_steps = steps
        return eps

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Finish a logical step: budget check, noise, scale, optimiser step, accounting.

        In the middle of a logical batch split into physical chunks it does
        nothing (the clipped sums keep accumulating).

        Returns:
            The wrapped optimizer's return value, or ``None`` when deferred.

        Raises:
            PrivacyBudgetExceededError: raised before any parameter changes.
        """
        if closure is not None:
            raise ValueError(
                "DPOptimizer.step does not take a closure: run the forward and backward "
                "before calling step()."
            )
        if not self.step_state.is_last_chunk:
            self.step_state.accumulating = True
            return None
        self.step_state.accumulating = False
        self.check_budget()
        s = self.settings
        add_gaussian_noise(self.params, s.noise_std(), self.generator)
        for p in self.params:
            assert p.grad is not None
            p.grad.div_(s.expected_batch_size)
        out = self.original_optimizer.step()
        self.accountant.step(self.noise_multiplier, s.sample_rate, 1)
        self.steps_taken += 1
        return out

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state plus the noise generator's state."""
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "noise_generator": self.generator.get_state(),
            "noise_multiplier": self.noise_multiplier,
            "steps_taken": self.steps_taken,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` saved."""
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["noise_generator"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.steps_taken = int(state["steps_taken"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the privatised parameter set is fixed when the run starts."""
        raise ValueError(
            "Cannot add a parameter group to a DPOptimizer: the parameters under privacy "
            "are fixed by make_private. Build the optimizer with all parameter groups first."
        )

    def __getattr__(self, name: str) -> Any:
        if name == "original_optimizer":
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)
