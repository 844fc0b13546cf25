"""The budget checks of a DP optimizer: refuse a step that would pass the target ε."""

from __future__ import annotations

from swiftdp.accounting import PrivacyAccountant
from swiftdp.errors import PrivacyBudgetExceededError
from swiftdp.settings import PrivacySettings

__all__ = ["BudgetControl"]


class BudgetControl:
    """The budget methods of :class:`~swiftdp.optim.optimizer.DPOptimizer`."""

    accountant: PrivacyAccountant
    _verified_steps: int
    _verified_sigma: float | None

    @property
    def settings(self) -> PrivacySettings:  # (DPOptimizer's)
        raise NotImplementedError

    @property
    def noise_multiplier(self) -> float:  # (DPOptimizer's)
        raise NotImplementedError

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
        sigma = self.noise_multiplier
        if homogeneous and sigma == self._verified_sigma and upcoming <= self._verified_steps:
            return
        eps = self.epsilon_after_next_step()
        if eps <= target:
            if homogeneous:
                object.__setattr__(self, "_verified_steps", upcoming)
                object.__setattr__(self, "_verified_sigma", sigma)
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
            object.__setattr__(self, "_verified_steps", steps)
            object.__setattr__(self, "_verified_sigma", self.noise_multiplier)
        return eps
