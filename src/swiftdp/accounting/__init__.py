"""Privacy accounting for DP-SGD: how much (ε, δ) a run of noisy steps spends.

- :class:`PrivacyAccountant` keeps the history of steps (σ, q, steps) and
  reports ε or δ with PLD (default), RDP or PRV accounting, or the GDP-CLT
  approximation (not a bound).
- :func:`get_noise_multiplier` finds the smallest σ that meets a budget.
- :func:`steps_for_epochs` counts steps exactly (90 epochs at q = 0.04 is 2250).

All accounting math comes from ``dp_accounting`` and ``prv_accountant``,
except GDP's two closed-form formulas (:mod:`swiftdp.accounting.gdp`).
"""

from swiftdp.accounting.accountant import PrivacyAccountant
from swiftdp.accounting.calibration import get_noise_multiplier, steps_for_epochs
from swiftdp.accounting.history import AccountingSegment
from swiftdp.accounting.mechanisms import MECHANISMS

__all__ = [
    "MECHANISMS",
    "AccountingSegment",
    "PrivacyAccountant",
    "get_noise_multiplier",
    "steps_for_epochs",
]
