"""`--noise-schedule`, `--clip-schedule`, `--adaptive-clipping`: their text and the library objects."""

from __future__ import annotations

import pytest

import swiftdp
from swiftdp.cli.specs import (
    SpecError,
    build_adaptive,
    build_schedule,
    parse_adaptive,
    parse_schedule,
)


@pytest.mark.parametrize(("text", "canonical"), [
    ("exp:0.990", "exp:0.99"),
    ("exp:1", "exp:1"),
    ("exp:0.5:0.010", "exp:0.5:0.01"),
    (" step:100:0.5 ", "step:100:0.5"),
    ("step:3:2.0", "step:3:2"),
])
def test_schedule_specs_are_written_canonically(text, canonical):
    assert parse_schedule(text) == canonical
    assert parse_schedule(canonical) == canonical


def test_schedule_specs_build_the_library_schedules_from_the_initial_value():
    assert build_schedule("exp:0.5:0.3", 2.0) == swiftdp.ExponentialSchedule(2.0, 0.5, 0.3)
    assert build_schedule("exp:0.9", 1.0) == swiftdp.ExponentialSchedule(1.0, 0.9, 0.0)
    assert build_schedule("step:10:0.1", 4.0) == swiftdp.StepSchedule(4.0, 10, 0.1)
    assert [build_schedule("exp:0.5:0.3", 2.0)(t) for t in range(4)] == [2.0, 1.0, 0.5, 0.3]


@pytest.mark.parametrize(("text", "canonical", "built"), [
    ("0.5", "0.5:0.2", swiftdp.AdaptiveClipping(0.5, 0.2, None)),
    ("0.9:0.05", "0.9:0.05", swiftdp.AdaptiveClipping(0.9, 0.05, None)),
    ("0.25:1:7.50", "0.25:1:7.5", swiftdp.AdaptiveClipping(0.25, 1.0, 7.5)),
])
def test_adaptive_specs_fill_in_the_library_defaults(text, canonical, built):
    assert parse_adaptive(text) == canonical
    assert build_adaptive(text) == built


@pytest.mark.parametrize(("parse", "text", "needle"), [
    (parse_schedule, "linear:0.9", "exp:GAMMA[:MIN] or step:SIZE:GAMMA"),
    (parse_schedule, "exp", "exp:GAMMA[:MIN] or step:SIZE:GAMMA"),
    (parse_schedule, "exp:0", "GAMMA must be > 0"),
    (parse_schedule, "exp:inf", "GAMMA must be > 0 and finite"),
    (parse_schedule, "exp:fast", "GAMMA must be a number, got 'fast'"),
    (parse_schedule, "exp:0.9:-1", "MIN must be >= 0"),
    (parse_schedule, "step:0:0.5", "SIZE must be an integer >= 1"),
    (parse_schedule, "step:1.5:0.5", "SIZE must be an integer >= 1"),
    (parse_schedule, "step:10", "exp:GAMMA[:MIN] or step:SIZE:GAMMA"),
    (parse_adaptive, "1.5", "QUANTILE must be in (0, 1)"),
    (parse_adaptive, "0.5:0", "LR must be > 0"),
    (parse_adaptive, "0.5:0.2:-3", "COUNT_NOISE must be > 0"),
    (parse_adaptive, "0.5:0.2:1:1", "QUANTILE[:LR[:COUNT_NOISE]]"),
])
def test_bad_specs_say_what_is_expected(parse, text, needle):
    with pytest.raises(SpecError) as info:
        parse(text)
    assert needle in str(info.value)
