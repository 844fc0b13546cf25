"""Contracts of get_noise_multiplier and steps_for_epochs, against external values."""

from __future__ import annotations

import doctest
import importlib.util
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

import swiftdp.accounting.accountant
import swiftdp.accounting.calibration
from swiftdp.accounting import PrivacyAccountant, get_noise_multiplier, steps_for_epochs
from swiftdp.errors import InvalidArgumentError

DELTA = 1e-5


def _epsilon(mechanism: str, sigma: float, q: float, steps: int) -> float:
    accountant = PrivacyAccountant(mechanism)
    accountant.step(sigma, q, steps)
    return accountant.epsilon(DELTA)


def test_steps_for_epochs_counts_90_epochs_at_q_004_as_2250():
    # BRIEF: int(90/0.04) = 2250 but 90//0.04 = 2249.0.
    assert 90 // 0.04 == 2249.0
    assert steps_for_epochs(90, 0.04) == 2250
    assert steps_for_epochs(90.0, 0.04) == 2250
    assert steps_for_epochs(15, 150 / 60000) == 6000
    assert steps_for_epochs(1, 1 / 3) == 3
    assert steps_for_epochs(1, Fraction(1, 3)) == 3


def test_steps_for_epochs_rounds_a_partial_last_epoch_up():
    assert steps_for_epochs(2.5, 0.04) == 63  # 62.5 steps
    assert steps_for_epochs(0.01, 0.5) == 1


@given(
    dataset_size=st.integers(1, 10_000_000),
    batch_fraction=st.floats(0.0, 1.0),
    epochs=st.integers(1, 1000),
)
def test_steps_for_epochs_is_the_exact_ceiling_of_epochs_times_n_over_b(
    dataset_size, batch_fraction, epochs
):
    batch_size = max(1, round(batch_fraction * dataset_size))
    exact = -(-epochs * dataset_size // batch_size)
    assert steps_for_epochs(epochs, batch_size / dataset_size) == exact
    assert steps_for_epochs(epochs, Fraction(batch_size, dataset_size)) == exact


def test_rdp_calibration_matches_opacus_for_90_epochs():
    # Opacus test: ε=8, δ=1e-5, q=0.04, 90 epochs, RDP -> σ ≈ 1.4160 (ε tolerance 0.01).
    sigma = get_noise_multiplier(8.0, DELTA, 0.04, epochs=90, mechanism="rdp")
    assert sigma == pytest.approx(1.4160, abs=2e-3)
    assert 8.0 - 0.01 <= _epsilon("rdp", sigma, 0.04, 2250) <= 8.0


@pytest.mark.parametrize(("mechanism", "expected"), [("rdp", 1.41587), ("pld", 1.34590)])
def test_calibration_matches_dp_accounting_and_never_exceeds_the_target(mechanism, expected):
    # dp-accounting calibrate_dp_mechanism: ε=8, δ=1e-5, q=0.04, 2250 steps.
    sigma = get_noise_multiplier(8.0, DELTA, 0.04, steps=2250, mechanism=mechanism)
    # The exact σ* is `expected`; the search returns a σ on the safe side of it, at
    # most as far as ε tolerance 0.01 allows (dε/dσ ≈ -8 here, so ~1.3e-3).
    assert expected - 1e-4 <= sigma <= expected + 2e-3
    epsilon = _epsilon(mechanism, sigma, 0.04, 2250)
    assert 8.0 - 0.01 <= epsilon <= 8.0


@pytest.mark.skipif(
    importlib.util.find_spec("prv_accountant") is None,
    reason="optional package prv-accountant is not installed",
)
def test_prv_calibration_never_exceeds_the_target():
    sigma = get_noise_multiplier(3.0, DELTA, 0.01, steps=300, mechanism="prv", tolerance=0.05)
    assert 3.0 - 0.05 <= _epsilon("prv", sigma, 0.01, 300) <= 3.0


def test_tighter_tolerance_lands_closer_below_the_target():
    sigma = get_noise_multiplier(
        2.0, DELTA, 256 / 60000, steps=14063, mechanism="rdp", tolerance=1e-4
    )
    assert 2.0 - 1e-4 <= _epsilon("rdp", sigma, 256 / 60000, 14063) <= 2.0


def test_unreachable_target_reports_the_epsilon_reached_and_the_fix():
    with pytest.raises(InvalidArgumentError) as info:
        get_noise_multiplier(1e-4, DELTA, 1.0, steps=10**9, mechanism="rdp")
    message = str(info.value)
    assert message.startswith(
        "target_epsilon=0.0001 is unreachable: even noise_multiplier=10000 spends epsilon="
    )
    assert "at delta=1e-05 with sample_rate=1.0 over 1000000000 steps." in message
    assert message.endswith(
        "Use a larger target_epsilon, fewer steps or epochs, or a smaller sample_rate "
        "(more data for the same batch size)."
    )
    reached = float(re.search(r"spends epsilon=(\S+) at", message).group(1))  # type: ignore[union-attr]
    assert reached > 1e-4


_EPS_FIX = "Pass the privacy budget epsilon as a positive finite number, e.g. 8.0."
_RATE_FIX = (
    "Pass the probability that each example is in a step, e.g. expected_batch_size / dataset_size."
)
_DELTA_FIX = "Pass a small positive delta such as 1e-5, well below 1 / dataset_size."
_ONE_OF = "Pass steps=<number of DP-SGD steps> or epochs=<passes over the data>."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, f"Expected target_epsilon > 0, got 0.0. {_EPS_FIX}"),
        ({"target_epsilon": -1.0}, f"Expected target_epsilon > 0, got -1.0. {_EPS_FIX}"),
        ({"target_epsilon": math.inf}, f"Expected a finite target_epsilon, got inf. {_EPS_FIX}"),
        ({"delta": 0.0}, f"Expected delta in (0, 1), got 0.0. {_DELTA_FIX}"),
        ({"delta": 1.0}, f"Expected delta in (0, 1), got 1.0. {_DELTA_FIX}"),
        ({"sample_rate": 0.0}, f"Expected sample_rate in (0, 1], got 0.0. {_RATE_FIX}"),
        ({"sample_rate": 1.5}, f"Expected sample_rate in (0, 1], got 1.5. {_RATE_FIX}"),
        (
            {"steps": None},
            f"Expected exactly one of steps and epochs, got steps=None and epochs=None. {_ONE_OF}",
        ),
        (
            {"epochs": 3},
            f"Expected exactly one of steps and epochs, got steps=100 and epochs=3. {_ONE_OF}",
        ),
        (
            {"steps": 0},
            "Expected steps >= 1, got 0. Pass the number of DP-SGD steps as an int >= 1.",
        ),
        (
            {"tolerance": 0.0},
            "Expected tolerance > 0 and finite, got 0.0. "
            "Pass how far below target_epsilon the result may land, e.g. 0.01.",
        ),
        (
            {"mechanism": "moments"},
            "Expected mechanism to be one of 'pld', 'rdp', 'prv', 'gdp', got 'moments'.",
        ),
    ],
)
def test_calibration_input_checks_name_the_argument_the_value_and_the_fix(kwargs, message):
    arguments = {
        "target_epsilon": 8.0,
        "delta": DELTA,
        "sample_rate": 0.04,
        "steps": 100,
        "mechanism": "rdp",
    }
    arguments.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        get_noise_multiplier(**arguments)


@pytest.mark.parametrize(
    ("epochs", "sample_rate", "message"),
    [
        (
            0,
            0.04,
            "Expected epochs > 0 and finite, got 0. Pass the number of passes over the data, e.g. 90.",
        ),
        (-2.0, 0.04, "Expected epochs > 0 and finite, got -2.0."),
        (90, 0.0, f"Expected sample_rate in (0, 1], got 0.0. {_RATE_FIX}"),
    ],
)
def test_steps_for_epochs_input_checks(epochs, sample_rate, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        steps_for_epochs(epochs, sample_rate)


@pytest.mark.parametrize("module", [swiftdp.accounting.accountant, swiftdp.accounting.calibration])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False)
    assert result.failed == 0
