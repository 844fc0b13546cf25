"""The accounting history: what DP-SGD did, as runs of identical steps.

A history is a tuple of :class:`AccountingSegment`: ``steps`` consecutive
Poisson-sampled Gaussian steps that used the same noise multiplier σ and
sampling rate q. Consecutive segments with the same (σ, q) are merged, so a
run of 2000 identical steps is one segment, and ε is a function of the merged
history only (the same history always gives the same ε, bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swiftdp.checks import check_noise_multiplier, check_sample_rate, check_steps


@dataclass(frozen=True)
class AccountingSegment:
    """``steps`` consecutive DP-SGD steps that all used the same σ and q.

    Each step samples every example independently with probability
    ``sample_rate`` (Poisson sampling), clips per-example gradients to norm C
    and adds Gaussian noise of standard deviation ``noise_multiplier * C``.

    Attributes:
        noise_multiplier: σ, the noise standard deviation in units of the
            clipping norm. 0 means no noise (no privacy: ε is infinite).
        sample_rate: q, the probability that an example is in a step. 0 means
            the steps read no data (they cost no privacy).
        steps: The number of steps, >= 1.

    Raises:
        InvalidArgumentError: If a field is out of range (σ < 0, q outside
            [0, 1], steps < 1).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate, allow_zero=True))
        object.__setattr__(self, "steps", check_steps(self.steps, name="steps", minimum=1))

    @property
    def is_private(self) -> bool:
        """False when the steps read data without noise (σ = 0 and q > 0)."""
        return not (self.noise_multiplier == 0 and self.sample_rate > 0)

    @property
    def costs_privacy(self) -> bool:
        """False when the steps read no data (q = 0), so they add nothing to ε."""
        return self.sample_rate > 0

    def same_mechanism(self, other: AccountingSegment) -> bool:
        """Whether ``other`` used the same σ and q (so the two can be merged)."""
        return (
            self.noise_multiplier == other.noise_multiplier
            and self.sample_rate == other.sample_rate
        )


History = tuple[AccountingSegment, ...]


def append_segment(history: History, segment: AccountingSegment) -> History:
    """Returns ``history`` followed by ``segment``, merged into the last segment if possible.

    Args:
        history: A merged history.
        segment: The steps to add.

    Returns:
        The new merged history (``history`` itself is not changed).
    """
    if history and history[-1].same_mechanism(segment):
        last = history[-1]
        merged = AccountingSegment(
            last.noise_multiplier, last.sample_rate, last.steps + segment.steps
        )
        return (*history[:-1], merged)
    return (*history, segment)


def merge_segments(segments: Iterable[AccountingSegment]) -> History:
    """Merges consecutive segments that used the same σ and q.

    Args:
        segments: Segments in the order the steps were taken.

    Returns:
        The merged history.
    """
    history: History = ()
    for segment in segments:
        history = append_segment(history, segment)
    return history
