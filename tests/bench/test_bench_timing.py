"""The timing helpers: interleaving, medians and the largest-batch search, on fake clocks."""

from __future__ import annotations

import pytest

from swiftdp.bench.timing import interleaved_times, largest_batch, median, plan_rounds


class FakeClock:
    """A clock that only moves when a fake step advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_median_of_odd_and_even_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError, match="at least one"):
        median([])


def test_interleaved_times_measure_each_step_on_a_fake_clock() -> None:
    clock = FakeClock()
    order: list[str] = []
    durations = {"base": iter([9.0, 1.0, 1.0, 5.0, 1.0]), "dp": iter([9.0, 2.0, 3.0, 2.0, 2.0])}

    def step(name: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            order.append(name)
            clock.now += next(durations[name])

        return run

    times = interleaved_times([step("base"), step("dp")], warmup=1, rounds=4, clock=clock)
    assert times == [[1.0, 1.0, 5.0, 1.0], [2.0, 3.0, 2.0, 2.0]]
    assert median(times[0]) == 1.0 and median(times[1]) == 2.0
    # warm-up round, then the order is reversed every other round
    assert order == ["base", "dp", "base", "dp", "dp", "base", "base", "dp", "dp", "base"]


def test_sync_is_called_around_every_timed_step() -> None:
    calls: list[int] = []
    interleaved_times([lambda: None], warmup=0, rounds=3, sync=lambda: calls.append(1))
    assert len(calls) == 6


def test_rounds_planned_from_the_warmup_time_within_bounds() -> None:
    clock = FakeClock()

    def slow() -> None:
        clock.now += 2.0

    seen: list[float] = []

    def plan(per_round: float) -> int:
        seen.append(per_round)
        return plan_rounds(per_round, budget_s=10.0, min_rounds=2, max_rounds=20)

    times = interleaved_times([slow], warmup=2, rounds=plan, clock=clock)
    assert seen == [2.0] and len(times[0]) == 5
    assert plan_rounds(100.0, 10.0, 3, 20) == 3
    assert plan_rounds(0.01, 10.0, 3, 20) == 20
    assert plan_rounds(1.0, 0.0, 3, 20) == 20


@pytest.mark.parametrize("capacity", [0, 1, 5, 64, 100, 1000, 4096])
def test_largest_batch_by_doubling_then_bisection(capacity: int) -> None:
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= capacity

    assert largest_batch(fits, start=8, limit=4096) == min(capacity, 4096)
    assert len(tried) <= 2 * 13
