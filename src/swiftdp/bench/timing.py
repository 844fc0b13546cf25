"""Timing helpers: interleaved step timing, medians, and the largest batch that fits.

Interleaving runs one step of every method being compared per round, so
that slow drifts of the machine (other processes, frequency scaling, thermal
state) hit all of them alike; the order is reversed every other round so that
no method always runs right after the same other one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

Clock = Callable[[], float]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (mean of the two middle ones for an even count).

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("Expected at least one timing to take the median of, got none.")
    return float(statistics.median(values))


def plan_rounds(seconds_per_round: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many timed rounds fit in ``budget_s``, clamped to ``[min_rounds, max_rounds]``.

    Args:
        seconds_per_round: the measured time of one round (all methods once).
        budget_s: the time allowed for the timed rounds; ``<= 0`` means no limit.
        min_rounds: the fewest rounds to time, whatever the budget.
        max_rounds: the most rounds to time.

    Returns:
        The number of rounds.
    """
    lo = max(1, min(min_rounds, max_rounds))
    if budget_s <= 0 or seconds_per_round <= 0:
        return max_rounds
    return max(lo, min(max_rounds, int(budget_s / seconds_per_round)))


def interleaved_times(
    steps: Sequence[Callable[[], object]],
    *,
    warmup: int,
    rounds: int | Callable[[float], int],
    clock: Clock = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Time ``steps`` interleaved: each round runs every step once.

    Args:
        steps: the step functions to compare (e.g. non-private, then DP).
        warmup: untimed rounds first (allocator, caches, lazy initialisation).
        rounds: the number of timed rounds, or a function of the mean
            warm-up round time (seconds) returning it (see :func:`plan_rounds`).
        clock: the clock (seconds); injectable for tests.
        sync: called before reading the clock (``torch.cuda.synchronize``
            on a GPU, so asynchronous kernels are counted).

    Returns:
        One list of per-step durations (seconds) for each entry of ``steps``,
        in the order of ``steps``.
    """

    def timed(fn: Callable[[], object]) -> float:
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - t0

    warm_total = 0.0
    for _ in range(warmup):
        warm_total += sum(timed(fn) for fn in steps)
    n = rounds if isinstance(rounds, int) else rounds(warm_total / warmup if warmup else 0.0)
    out: list[list[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    for r in range(n):
        for i in order if r % 2 == 0 else order[::-1]:
            out[i].append(timed(steps[i]))
    return out


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch size ``b <= limit`` with ``fits(b)``: doubling, then bisection.

    Assumes monotonicity (if ``b`` fits, every smaller batch fits).

    Args:
        fits: runs a step at batch size ``b`` and says whether it fit in memory.
        start: the first size tried.
        limit: the largest size tried.

    Returns:
        The largest size that fits, or 0 when not even ``1`` fits.
    """
    lo, hi = 0, None  # lo fits (0: none known); hi does not fit
    b = max(1, min(start, limit))
    while True:
        if fits(b):
            lo = b
            if b >= limit:
                return lo
            b = min(2 * b, limit)
        else:
            hi = b
            break
    if lo == 0:  # even the start did not fit: bisect below it
        lo_try = 1
        if not fits(lo_try):
            return 0
        lo = lo_try
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
