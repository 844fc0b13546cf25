"""Contracts of the "gdp" accountant (GDP-CLT): Opacus and closed-form reference values,
calibration, the approximation warning, input checks, and every place that takes its name.

References are never swiftdp's own output: Opacus 1.6.0's ``GaussianAccountant``
(one segment) and its ``analysis.gdp`` functions with μ² added over segments (a
history of several segments, which ``GaussianAccountant`` refuses), and a
closed form written here with scipy.stats.norm. Tolerance 1e-6 relative; the
agreement measured is ~1e-13.
"""

from __future__ import annotations

import doctest
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import GaussianAccountant
from opacus.accountants.analysis import gdp as opacus_gdp
from scipy import optimize
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
import swiftdp.accounting.gdp
from swiftdp.accounting import MECHANISMS, PrivacyAccountant, get_noise_multiplier
from swiftdp.accounting.gdp import GDP_WARNING, clt_mu, gdp_delta, gdp_epsilon
from swiftdp.accounting.history import AccountingSegment
from swiftdp.cli.main import main
from swiftdp.errors import InvalidArgumentError

pytestmark = pytest.mark.filterwarnings(
    "ignore:accountant 'gdp':UserWarning",
    "ignore:GDP accounting is experimental:UserWarning",  # Opacus' own warning
)

DELTA = 1e-5

# (σ, q, steps): MNIST-like, long and short runs, large q, large σ, large ε.
SINGLE_SEGMENTS = [
    (1.1, 256 / 60000, 14063),
    (1.0, 0.01, 1000),
    (0.8, 0.1, 50),
    (2.0, 0.001, 100_000),
    (0.6, 0.02, 3000),
    (5.0, 0.5, 10),
]
HISTORY = [(1.2, 0.02, 300), (0.9, 0.02, 60), (1.2, 0.05, 40), (3.0, 0.2, 7)]


def _gdp_accountant(history: list[tuple[float, float, int]]) -> PrivacyAccountant:
    accountant = PrivacyAccountant("gdp")
    for sigma, q, steps in history:
        accountant.step(sigma, q, steps)
    return accountant


def _closed_form_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """μ = sqrt(Σ steps·q²·(e^{1/σ²} − 1)); ε solves Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) = δ."""
    mu = math.sqrt(sum(n * q**2 * (math.exp(sigma**-2) - 1) for sigma, q, n in history))

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 700.0, xtol=1e-14)


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    reference = GaussianAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    return reference.get_epsilon(delta, poisson=True)


@pytest.mark.parametrize(("sigma", "q", "steps"), SINGLE_SEGMENTS)
def test_epsilon_matches_opacus_gaussian_accountant(sigma, q, steps):
    expected = _opacus_epsilon(sigma, q, steps, DELTA)
    assert _gdp_accountant([(sigma, q, steps)]).epsilon(DELTA) == pytest.approx(expected, rel=1e-6)


def test_heterogeneous_history_matches_opacus_gdp_with_mu_squared_added():
    # GaussianAccountant refuses a change of σ or q; its analysis functions give each
    # segment's μ, and μ-GDP composes to sqrt(Σ μ²)-GDP (Dong, Roth, Su 2022).
    mus = [
        opacus_gdp.compute_mu_poisson(steps=n, noise_multiplier=sigma, sample_rate=q)
        for sigma, q, n in HISTORY
    ]
    mu = math.sqrt(sum(m**2 for m in mus))
    expected = opacus_gdp.eps_from_mu(mu=mu, delta=DELTA)
    assert _gdp_accountant(HISTORY).epsilon(DELTA) == pytest.approx(expected, rel=1e-6)
    assert clt_mu(AccountingSegment(*s) for s in HISTORY) == pytest.approx(mu, rel=1e-12)


@pytest.mark.parametrize("history", [*([s] for s in SINGLE_SEGMENTS), HISTORY])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_epsilon_matches_the_closed_form_written_independently(history, delta):
    expected = _closed_form_epsilon(history, delta)
    assert _gdp_accountant(history).epsilon(delta) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 2.0, 8.0])
def test_delta_is_the_gdp_dual_of_epsilon(epsilon):
    accountant = _gdp_accountant(HISTORY)
    mu = math.sqrt(sum(n * q**2 * (math.exp(sigma**-2) - 1) for sigma, q, n in HISTORY))
    expected = norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
    assert accountant.delta(epsilon) == pytest.approx(expected, rel=1e-9)
    # and ε(δ(ε)) gives ε back
    if epsilon > 0:
        assert accountant.epsilon(accountant.delta(epsilon)) == pytest.approx(epsilon, rel=1e-9)


def test_order_of_segments_does_not_change_epsilon():
    forward = _gdp_accountant(HISTORY).epsilon(DELTA)
    backward = _gdp_accountant(HISTORY[::-1]).epsilon(DELTA)
    assert backward == pytest.approx(forward, rel=1e-12)


def test_edge_cases_zero_infinite_and_huge_epsilon():
    assert gdp_epsilon(0.0, DELTA) == 0.0
    assert gdp_epsilon(1e-9, DELTA) == 0.0  # δ(0) = 2Φ(μ/2) − 1 < δ already
    assert gdp_epsilon(math.inf, DELTA) == math.inf
    assert gdp_delta(math.inf, 3.0) == 1.0
    assert clt_mu([AccountingSegment(0.01, 0.1, 1)]) == math.inf  # e^{1/σ²} overflows
    # ε far beyond Opacus' bracket [0, 500] is still found: δ(ε) = δ at the root.
    huge = gdp_epsilon(60.0, DELTA)
    assert huge > 1000 and gdp_delta(60.0, huge) == pytest.approx(DELTA, rel=1e-6)


@pytest.mark.parametrize(
    ("target", "q", "steps", "tolerance"),
    [(3.0, 0.01, 1000, 0.01), (8.0, 0.04, 2250, 0.01), (1.0, 256 / 60000, 14063, 1e-4)],
)
def test_calibrated_sigma_meets_the_target_from_below(target, q, steps, tolerance):
    sigma = get_noise_multiplier(target, DELTA, q, steps=steps, mechanism="gdp", tolerance=tolerance)
    epsilon = _gdp_accountant([(sigma, q, steps)]).epsilon(DELTA)
    assert target - tolerance <= epsilon <= target
    assert _closed_form_epsilon([(sigma, q, steps)], DELTA) == pytest.approx(epsilon, rel=1e-6)


def test_gdp_can_report_less_epsilon_than_is_spent_so_it_is_not_a_bound():
    # Few steps, large q: the CLT approximation falls below PLD's ε, an upper bound
    # tight to ~1e-4 here (1.2785), by 5%. This is why "gdp" warns.
    gdp = _gdp_accountant([(5.0, 0.5, 10)]).epsilon(DELTA)
    pld = PrivacyAccountant("pld")
    pld.step(5.0, 0.5, 10)
    assert gdp < 0.96 * pld.epsilon(DELTA)


def test_creating_a_gdp_accountant_warns_that_it_is_not_a_bound():
    with pytest.warns(UserWarning, match=re.escape("is an approximation, not an upper bound")):
        PrivacyAccountant("gdp")
    with pytest.warns(UserWarning, match=re.escape(GDP_WARNING)):
        get_noise_multiplier(3.0, DELTA, 0.01, steps=100, mechanism="gdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrivacyAccountant("rdp")  # the others stay silent


def test_gdp_is_accepted_everywhere_an_accountant_name_is():
    assert "gdp" in MECHANISMS
    assert PrivacyAccountant("gdp").mechanism == "gdp"
    saved = _gdp_accountant(HISTORY).state_dict()
    assert saved["mechanism"] == "gdp"
    with pytest.raises(swiftdp.errors.CheckpointError, match="mechanism='gdp'"):
        PrivacyAccountant("rdp").load_state_dict(saved)


def test_cli_epsilon_accepts_the_gdp_accountant(capsys):
    assert main(["epsilon", "--sigma", "1.1", "--sample-rate", str(256 / 60000),
                 "--steps", "14063", "--accountant", "gdp"]) == 0
    values = {line[:12].strip(): line[12:].strip() for line in capsys.readouterr().out.splitlines()}
    assert values["accountant"] == "gdp"
    expected = _opacus_epsilon(1.1, 256 / 60000, 14063, DELTA)
    assert float(values["epsilon"]) == pytest.approx(expected, abs=2e-6)


def test_make_private_with_gdp_calibrates_and_accounts_with_gdp():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g))
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, optimizer, DataLoader(data, batch_size=8), target_epsilon=2.0,
                              delta=1e-3, epochs=2, max_grad_norm=1.0, seed=0, accountant="gdp")
    for _ in range(2):  # the 2 planned epochs, 5 steps each
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
    sigma, q = dp.privacy.noise_multiplier, dp.privacy.sample_rate
    assert dp.privacy.accountant == "gdp" and q == 8 / 40 and dp.steps == 10
    expected = _closed_form_epsilon([(sigma, q, dp.steps)], 1e-3)
    assert dp.epsilon() == pytest.approx(expected, rel=1e-6)
    assert 2.0 - 0.01 <= expected <= 2.0  # σ was calibrated with gdp for the 10 planned steps


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PrivacyAccountant("gdp").epsilon(0.0), "Expected delta in (0, 1), got 0.0."),
        (lambda: PrivacyAccountant("gdp").delta(-1.0), "Expected epsilon >= 0, got -1.0."),
        (lambda: PrivacyAccountant("gdp").step(-0.5, 0.1), "Expected noise_multiplier >= 0, got -0.5."),
        (lambda: PrivacyAccountant("gdp").step(1.0, 1.5), "Expected sample_rate in [0, 1], got 1.5."),
        (
            lambda: get_noise_multiplier(-1.0, DELTA, 0.01, steps=10, mechanism="gdp"),
            "Expected target_epsilon > 0, got -1.0.",
        ),
        (
            lambda: get_noise_multiplier(1e-4, DELTA, 1.0, steps=10**9, mechanism="gdp"),
            "target_epsilon=0.0001 is unreachable: even noise_multiplier=10000 spends epsilon=",
        ),
        (
            lambda: PrivacyAccountant("GDP"),
            "Expected mechanism to be one of 'pld', 'rdp', 'prv', 'gdp', got 'GDP'.",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        call()


def test_docstring_examples_run():
    assert doctest.testmod(swiftdp.accounting.gdp, raise_on_error=False).failed == 0
