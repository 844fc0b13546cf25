"""Contracts of PrivacyAccountant: history, composition, caching, checkpoints, input checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from swiftdp.accounting import MECHANISMS, AccountingSegment, PrivacyAccountant
from swiftdp.accounting.mechanisms import PLD_VALUE_DISCRETIZATION_INTERVAL, history_event
from swiftdp.errors import CheckpointError, InvalidArgumentError

DELTA = 1e-5

requires_prv = pytest.mark.skipif(
    importlib.util.find_spec("prv_accountant") is None,
    reason="optional package prv-accountant is not installed",
)
ALL_MECHANISMS = [
    "pld",
    "rdp",
    pytest.param("prv", marks=requires_prv),
    pytest.param("gdp", marks=pytest.mark.filterwarnings("ignore:accountant 'gdp':UserWarning")),
]


def test_mechanisms_lists_every_accepted_name_default_first():
    assert MECHANISMS == ("pld", "rdp", "prv", "gdp")
    assert PrivacyAccountant().mechanism == "pld"


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_each_mechanism_builds_an_accountant(mechanism):
    assert PrivacyAccountant(mechanism).mechanism == mechanism


def test_prv_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prv_accountant", None)  # makes the import fail
    message = (
        "Expected mechanism 'prv' to find the package prv-accountant, which is not installed. "
        "Install it with `pip install 'swiftdp[prv]'`, or use mechanism='pld'"
    )
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        PrivacyAccountant("prv")


def test_history_merges_consecutive_identical_steps_only():
    accountant = PrivacyAccountant("rdp")
    for _ in range(3):
        accountant.step(1.0, 0.01)
    accountant.step(1.0, 0.01, num_steps=2)
    accountant.step(2.0, 0.01)
    accountant.step(1.0, 0.01)
    accountant.step(1.0, 0.01, num_steps=0)
    assert accountant.history == (
        AccountingSegment(1.0, 0.01, 5),
        AccountingSegment(2.0, 0.01, 1),
        AccountingSegment(1.0, 0.01, 1),
    )
    assert accountant.total_steps == 7


def test_accounting_segment_is_frozen_and_checked():
    segment = AccountingSegment(1, 0.5, 3)
    assert segment.noise_multiplier == 1.0 and isinstance(segment.noise_multiplier, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        segment.steps = 4  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="Expected steps >= 1, got 0"):
        AccountingSegment(1.0, 0.5, 0)


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_zero_noise_gives_infinite_epsilon_not_an_error(mechanism):
    accountant = PrivacyAccountant(mechanism)
    accountant.step(1.0, 0.01, 10)
    accountant.step(0.0, 0.01)
    assert accountant.epsilon(DELTA) == math.inf
    assert accountant.delta(1.0) == 1.0


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_no_data_or_no_steps_cost_nothing(mechanism):
    accountant = PrivacyAccountant(mechanism)
    assert accountant.epsilon(DELTA) == 0.0
    accountant.step(1.0, 0.01, num_steps=0)
    accountant.step(0.0, 0.0, num_steps=5)  # q = 0: no example is read, even without noise
    assert accountant.epsilon(DELTA) == 0.0
    assert accountant.delta(0.5) == 0.0
    assert accountant.total_steps == 5


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_epsilon_is_exactly_what_dp_accounting_reports_for_the_history(mechanism):
    # The cached, incremental computation must equal dp-accounting's own accountant
    # on the history's ComposedDpEvent, bit for bit, however the steps arrived.
    accountant = PrivacyAccountant(mechanism)
    steps = [(1.2, 0.02, 10), (0.9, 0.02, 6), (1.2, 0.05, 4), (0.9, 0.02, 2)]
    for sigma, q, n in steps:
        for _ in range(2):
            accountant.epsilon(DELTA)  # fill caches at every prefix
            accountant.step(sigma, q, n // 2)
    reference: dp_accounting.PrivacyAccountant
    if mechanism == "pld":
        reference = pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL
        )
    else:
        reference = rdp_privacy_accountant.RdpAccountant()
    reference.compose(history_event(accountant.history))
    assert accountant.epsilon(DELTA) == reference.get_epsilon(DELTA)
    assert accountant.delta(2.0) == reference.get_delta(2.0)


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_changing_sigma_mid_training_composes_between_the_constant_runs(mechanism):
    q, n1, n2, sigma1, sigma2 = 0.01, 300, 200, 1.0, 2.0
    mixed = PrivacyAccountant(mechanism)
    mixed.step(sigma1, q, n1)
    mixed.step(sigma2, q, n2)
    all_low = PrivacyAccountant(mechanism)
    all_low.step(sigma1, q, n1 + n2)
    all_high = PrivacyAccountant(mechanism)
    all_high.step(sigma2, q, n1 + n2)
    assert all_high.epsilon(DELTA) < mixed.epsilon(DELTA) < all_low.epsilon(DELTA)


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_epsilon_after_predicts_the_next_epsilon_without_recording(mechanism):
    accountant = PrivacyAccountant(mechanism)
    accountant.step(1.1, 0.01, 200)
    before = accountant.epsilon(DELTA)
    predicted = accountant.epsilon_after(1.1, 0.01, 1, DELTA)
    assert accountant.total_steps == 200
    assert accountant.epsilon(DELTA) == before
    assert predicted > before
    assert accountant.epsilon_after(0.7, 0.01, 0, DELTA) == before
    accountant.step(1.1, 0.01)
    assert accountant.epsilon(DELTA) == predicted


def test_epsilon_after_then_step_then_epsilon_is_served_from_the_cache(monkeypatch):
    accountant = PrivacyAccountant("pld")
    accountant.step(1.1, 0.01, 100)
    predicted = accountant.epsilon_after(1.1, 0.01, 1, DELTA)
    accountant.step(1.1, 0.01)

    def recompute(*args: object) -> float:
        raise AssertionError("epsilon was recomputed instead of read from the cache")

    monkeypatch.setattr(accountant._engine, "_epsilon", recompute)
    assert accountant.epsilon(DELTA) == predicted


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_state_dict_round_trips_exactly_through_json(mechanism):
    accountant = PrivacyAccountant(mechanism)
    accountant.step(1.3, 150 / 60000, 100)
    accountant.step(0.9, 0.1, 7)
    state = accountant.state_dict()
    restored_state = json.loads(json.dumps(state))  # plain Python types only
    assert restored_state == state
    resumed = PrivacyAccountant(mechanism)
    resumed.load_state_dict(restored_state)
    assert resumed.history == accountant.history
    assert resumed.epsilon(DELTA) == accountant.epsilon(DELTA)


def test_load_state_dict_refuses_another_mechanism_and_keeps_history():
    source = PrivacyAccountant("rdp")
    source.step(1.0, 0.01, 5)
    target = PrivacyAccountant("pld")
    target.step(2.0, 0.01, 3)
    message = (
        "The checkpoint's accountant used mechanism='rdp', but this accountant uses "
        "mechanism='pld'. Create PrivacyAccountant(mechanism='rdp') to resume this run."
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        target.load_state_dict(source.state_dict())
    assert target.history == (AccountingSegment(2.0, 0.01, 3),)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda s: [1, 2],
            "Expected the accountant state to be a dict from state_dict(), got list.",
        ),
        (
            lambda s: {"mechanism": "pld"},
            "The accountant state lacks the keys ['format', 'history']",
        ),
        (
            lambda s: {**s, "format": "other/9"},
            "Expected accountant state format 'swiftdp.accounting/1', got 'other/9'.",
        ),
        (
            lambda s: {**s, "history": "x"},
            "Expected the accountant state's history to be a list, got str.",
        ),
        (
            lambda s: {
                **s,
                "history": [{"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 2}],
            },
            "history[0] = {'noise_multiplier': -1.0, 'sample_rate': 0.1, 'steps': 2} is invalid "
            "(Expected noise_multiplier >= 0, got -1.0.",
        ),
        (lambda s: {**s, "history": [{"steps": 2}]}, "history[0] = {'steps': 2} is invalid"),
        (
            lambda s: {**s, "history": [[1.0, 0.1, 2]]},
            "history[0] = [1.0, 0.1, 2] is invalid (expected a dict",
        ),
    ],
)
def test_load_state_dict_names_what_is_corrupt(corrupt, message):
    accountant = PrivacyAccountant("pld")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        accountant.load_state_dict(corrupt(accountant.state_dict()))


_SIGMA_FIX = "Pass a non-negative noise multiplier (0 disables noise)."
_RATE_FIX = (
    "Pass the probability that each example is in a step, e.g. expected_batch_size / dataset_size."
)
_DELTA_FIX = "Pass a small positive delta such as 1e-5, well below 1 / dataset_size."
_EPS_FIX = "Pass the privacy budget epsilon as a positive finite number, e.g. 8.0."


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.step(-1.0, 0.1), f"Expected noise_multiplier >= 0, got -1.0. {_SIGMA_FIX}"),
        (
            lambda a: a.step(math.inf, 0.1),
            f"Expected a finite noise_multiplier, got inf. {_SIGMA_FIX}",
        ),
        (
            lambda a: a.step(math.nan, 0.1),
            f"Expected noise_multiplier to be a number, got nan. {_SIGMA_FIX}",
        ),
        (
            lambda a: a.step("1.0", 0.1),
            f"Expected noise_multiplier to be a real number, got '1.0' (type str). {_SIGMA_FIX}",
        ),
        (lambda a: a.step(1.0, 1.5), f"Expected sample_rate in [0, 1], got 1.5. {_RATE_FIX}"),
        (lambda a: a.step(1.0, -0.1), f"Expected sample_rate in [0, 1], got -0.1. {_RATE_FIX}"),
        (
            lambda a: a.step(1.0, 0.1, -3),
            "Expected num_steps >= 0, got -3. Pass the number of DP-SGD steps as an int >= 0.",
        ),
        (
            lambda a: a.step(1.0, 0.1, 2.5),
            "Expected num_steps to be an int, got 2.5 (type float). "
            "Pass the number of DP-SGD steps as an int >= 0.",
        ),
        (
            lambda a: a.step(1.0, 0.1, True),
            "Expected num_steps to be an int, got True (type bool).",
        ),
        (lambda a: a.epsilon(0.0), f"Expected delta in (0, 1), got 0.0. {_DELTA_FIX}"),
        (lambda a: a.epsilon(1.0), f"Expected delta in (0, 1), got 1.0. {_DELTA_FIX}"),
        (lambda a: a.epsilon(-1e-5), f"Expected delta in (0, 1), got -1e-05. {_DELTA_FIX}"),
        (lambda a: a.delta(-1.0), f"Expected epsilon >= 0, got -1.0. {_EPS_FIX}"),
        (lambda a: a.delta(math.inf), f"Expected a finite epsilon, got inf. {_EPS_FIX}"),
        (
            lambda a: a.epsilon_after(-1.0, 0.1, 1, 1e-5),
            f"Expected noise_multiplier >= 0, got -1.0. {_SIGMA_FIX}",
        ),
        (
            lambda a: a.epsilon_after(1.0, 0.1, 1, 2.0),
            f"Expected delta in (0, 1), got 2.0. {_DELTA_FIX}",
        ),
    ],
)
def test_input_checks_name_the_argument_the_value_and_the_fix(call, message):
    accountant = PrivacyAccountant("rdp")
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call(accountant)
    assert accountant.history == ()


def test_unknown_mechanism_lists_the_valid_ones():
    message = (
        "Expected mechanism to be one of 'pld', 'rdp', 'prv', 'gdp', got 'moments'. Pass "
        "mechanism='pld' (tight, the default), 'rdp' (fast, looser), 'prv' or 'gdp' (an "
        "approximation, not a bound)."
    )
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        PrivacyAccountant("moments")


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        PrivacyAccountant("rdp").step(-1.0, 0.1)
