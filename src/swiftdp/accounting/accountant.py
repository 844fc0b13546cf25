"""The privacy accountant: a visible history of DP-SGD steps and the (ε, δ) it spends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swiftdp.accounting.history import AccountingSegment, History, append_segment, merge_segments
from swiftdp.accounting.mechanisms import make_mechanism
from swiftdp.checks import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)
from swiftdp.errors import CheckpointError, InvalidArgumentError

STATE_FORMAT = "swiftdp.accounting/1"


def _segment(
    noise_multiplier: object, sample_rate: object, num_steps: object
) -> AccountingSegment | None:
    """Checks one step request; returns its segment, or None when ``num_steps`` is 0."""
    sigma = check_noise_multiplier(noise_multiplier)
    rate = check_sample_rate(sample_rate, allow_zero=True)  # q = 0: a step that reads no data
    steps = check_steps(num_steps)
    return AccountingSegment(sigma, rate, steps) if steps else None


class PrivacyAccountant:
    """Tracks the privacy spent by Poisson-sampled Gaussian (DP-SGD) steps.

    The state is the history only: a tuple of :class:`AccountingSegment`
    ``(noise_multiplier, sample_rate, steps)``, consecutive identical steps
    merged. σ and q may change between steps; the segments are composed in
    order. ε is a deterministic function of the history, so a run resumed from
    :meth:`state_dict` reports exactly the ε it would have reported.

    Results are cached: ``epsilon()`` after every training step costs one
    composition of the last segment (PLD, ~0.2 s for 2000 steps at q = 0.04),
    a sum of cached curves (RDP, ~1 ms), or a fresh computation (PRV, ~1 s;
    GDP, closed form, ~0.1 ms); and ``epsilon()`` right after ``epsilon_after(...)`` and ``step(...)`` with
    the same arguments is free.

    Guarantee: with mechanism ``"pld"``, ``"rdp"`` or ``"prv"`` the reported ε is
    an upper bound (pessimistic PLD discretisation, RDP conversion, PRV upper
    bound) for the add/remove-one neighbouring relation, provided each step
    really samples every example independently with probability ``sample_rate``
    and adds N(0, σ²C²) noise to a sum of gradients clipped to norm C.

    No guarantee with mechanism ``"gdp"``: Gaussian DP by the central limit
    theorem (Bu et al. 2020, as Opacus' ``GaussianAccountant``) is an
    approximation that can report less ε than is spent, most for few steps
    and large q; Opacus calls it experimental. Creating a ``"gdp"``
    accountant warns so. See :mod:`swiftdp.accounting.gdp`.

    Args:
        mechanism: One of ``"pld"`` (default), ``"rdp"``, ``"prv"``, ``"gdp"``.

    Raises:
        InvalidArgumentError: If ``mechanism`` is unknown (or ``"prv"`` without
            the prv-accountant package).

    Warns:
        UserWarning: For ``"gdp"``, that its ε is an approximation, not a bound.

    Example:
        >>> accountant = PrivacyAccountant("rdp")
        >>> accountant.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14063)
        >>> round(accountant.epsilon(delta=1e-5), 4)
        2.5967

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
        https://arxiv.org/abs/1607.00133.
    """

    def __init__(self, mechanism: str = "pld") -> None:
        self._engine = make_mechanism(mechanism)
        self._history: History = ()

    @property
    def mechanism(self) -> str:
        """The accounting mechanism's name (``"pld"``, ``"rdp"``, ``"prv"`` or ``"gdp"``)."""
        return self._engine.name

    @property
    def history(self) -> tuple[AccountingSegment, ...]:
        """The steps taken so far, as merged segments in order."""
        return self._history

    @property
    def total_steps(self) -> int:
        """The number of steps taken so far."""
        return sum(segment.steps for segment in self._history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Records ``num_steps`` steps with noise multiplier σ and sampling rate q.

        Args:
            noise_multiplier: σ, noise standard deviation over clipping norm
                (0 means no noise: ε becomes infinite).
            sample_rate: q in [0, 1], the Poisson sampling probability.
            num_steps: How many such steps were taken (0 records nothing).

        Raises:
            InvalidArgumentError: If σ < 0, q is outside [0, 1] or
                ``num_steps`` is negative; nothing is recorded then.
        """
        segment = _segment(noise_multiplier, sample_rate, num_steps)
        if segment is not None:
            self._history = append_segment(self._history, segment)

    def epsilon(self, delta: float) -> float:
        """The ε spent so far at ``delta``.

        Args:
            delta: Target δ in (0, 1).

        Returns:
            ε >= 0; 0.0 before any step that reads data, ``math.inf`` once a
            step with σ = 0 and q > 0 was taken.

        Raises:
            InvalidArgumentError: If ``delta`` is not in (0, 1).
        """
        return self._engine.epsilon(self._history, check_delta(delta))

    def delta(self, epsilon: float) -> float:
        """The δ spent so far at ``epsilon``.

        Args:
            epsilon: Target ε >= 0.

        Returns:
            δ in [0, 1]; 1.0 once a step with σ = 0 and q > 0 was taken.

        Raises:
            InvalidArgumentError: If ``epsilon`` is negative or not finite.
        """
        return self._engine.delta(self._history, check_epsilon(epsilon))

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, num_steps: int, delta: float
    ) -> float:
        """The ε that would be spent after ``num_steps`` more steps; records nothing.

        Use it to refuse a step before taking it: if
        ``epsilon_after(σ, q, 1, δ) > target_epsilon`` the step would exceed
        the budget. The result is cached, so ``step(σ, q, 1)`` followed by
        ``epsilon(δ)`` costs nothing more.

        Args:
            noise_multiplier: σ of the prospective steps.
            sample_rate: q of the prospective steps.
            num_steps: How many prospective steps (0 gives the current ε).
            delta: Target δ in (0, 1).

        Returns:
            The ε of the history followed by those steps.

        Raises:
            InvalidArgumentError: If an argument is out of range.
        """
        segment = _segment(noise_multiplier, sample_rate, num_steps)
        delta = check_delta(delta)
        history = self._history if segment is None else append_segment(self._history, segment)
        return self._engine.epsilon(history, delta)

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state as plain Python types (str, int, float, list, dict).

        Returns:
            ``{"format": ..., "mechanism": ..., "history": [{"noise_multiplier":
            σ, "sample_rate": q, "steps": n}, ...]}``; floats are stored as is,
            so :meth:`load_state_dict` restores the exact history and ε.
        """
        return {
            "format": STATE_FORMAT,
            "mechanism": self.mechanism,
            "history": [
                {
                    "noise_multiplier": s.noise_multiplier,
                    "sample_rate": s.sample_rate,
                    "steps": s.steps,
                }
                for s in self._history
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces the history with the one saved by :meth:`state_dict`.

        Args:
            state: A dict produced by :meth:`state_dict`.

        Raises:
            CheckpointError: If ``state`` is malformed, has an invalid segment,
                or was written by an accountant with another mechanism (ε would
                silently change on resume). The history is unchanged then.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"Expected the accountant state to be a dict from state_dict(), got "
                f"{type(state).__name__}. Pass the dict saved from PrivacyAccountant.state_dict()."
            )
        missing = [k for k in ("format", "mechanism", "history") if k not in state]
        if missing:
            raise CheckpointError(
                f"The accountant state lacks the keys {missing}; got keys {sorted(state)}. "
                "Pass the dict saved from PrivacyAccountant.state_dict()."
            )
        if state["format"] != STATE_FORMAT:
            raise CheckpointError(
                f"Expected accountant state format {STATE_FORMAT!r}, got {state['format']!r}. "
                "The checkpoint was written by an incompatible swiftdp version."
            )
        if state["mechanism"] != self.mechanism:
            raise CheckpointError(
                f"The checkpoint's accountant used mechanism={state['mechanism']!r}, but this "
                f"accountant uses mechanism={self.mechanism!r}. Create "
                f"PrivacyAccountant(mechanism={state['mechanism']!r}) to resume this run."
            )
        entries = state["history"]
        if not isinstance(entries, list | tuple):
            raise CheckpointError(
                f"Expected the accountant state's history to be a list, got "
                f"{type(entries).__name__}. The checkpoint is corrupt."
            )
        segments = []
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, Mapping):
                    raise InvalidArgumentError(f"expected a dict, got {entry!r}")
                segments.append(
                    AccountingSegment(
                        entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
                    )
                )
            except (KeyError, InvalidArgumentError) as err:
                raise CheckpointError(
                    f"The accountant state's history[{index}] = {entry!r} is invalid ({err}). "
                    "The checkpoint is corrupt."
                ) from err
        self._history = merge_segments(segments)

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(mechanism={self.mechanism!r}, "
            f"total_steps={self.total_steps}, segments={len(self._history)})"
        )
