"""ε and δ against external reference values (other libraries' tests, BRIEF.md).

Every expected number below comes from Opacus, TF Privacy, dp-accounting or
prv-accountant, never from swiftdp's own output. Tolerances:

- RDP: 1e-6 relative, except Opacus' σ=1.5, q=0.04 value (see its test).
- PLD (value_discretization_interval = 1e-4, dp-accounting's default):
  1e-5 relative; the published values are matched to ~1e-7, and a coarser
  interval would over-state ε (2e-4 already gives 5e-4 too much on 0.640111).
- PRV (eps_error = 0.01, delta_error = δ/1000, Opacus' settings): 1e-6
  relative. The upper bound is reproduced to ~1e-10; 1e-6 leaves room for FFT
  round-off across platforms while staying far below the algorithm's own
  ε error of 0.01, so a change of discretisation would still be caught.
"""

from __future__ import annotations

import importlib.util

import pytest

from swiftdp.accounting import PrivacyAccountant, steps_for_epochs

DELTA = 1e-5

requires_prv = pytest.mark.skipif(
    importlib.util.find_spec("prv_accountant") is None,
    reason="optional package prv-accountant is not installed",
)


def _epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    accountant = PrivacyAccountant(mechanism)
    accountant.step(sigma, q, steps)
    return accountant.epsilon(delta)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta", "expected", "source"),
    [
        (1.1, 256 / 60000, 14063, DELTA, 2.596656, "dp-accounting"),
        (1.3, 150 / 60000, 6000, DELTA, 0.724223, "dp-accounting"),
    ],
)
def test_rdp_epsilon_matches_published_values(sigma, q, steps, delta, expected, source):
    assert _epsilon("rdp", sigma, q, steps, delta) == pytest.approx(expected, rel=1e-6), source


@pytest.mark.parametrize(
    ("dataset_size", "batch_size", "sigma", "epochs", "delta", "expected"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842),
    ],
)
def test_rdp_epsilon_matches_tf_privacy_compute_dp_sgd_privacy(
    dataset_size, batch_size, sigma, epochs, delta, expected
):
    q = batch_size / dataset_size
    steps = steps_for_epochs(epochs, q)
    assert steps == epochs * dataset_size // batch_size
    assert _epsilon("rdp", sigma, q, steps, delta) == pytest.approx(expected, rel=1e-9)


def test_rdp_epsilon_matches_opacus_and_never_undercuts_it():
    # Opacus' accountants test: σ=1.5, q=0.04, int(90/0.04)=2250 steps -> 7.32911117143.
    # The optimal order is α=3.9 in both order grids (dp-accounting's default and
    # Opacus' [1.1, ..., 10.9] + [12, ..., 63]), so the grid is not the cause of
    # the 3.05e-5 relative gap: for fractional α, dp-accounting 0.6.0 sums the
    # absolute values of the binomial series terms (an upper bound on A_α), where
    # Opacus' older TF-Privacy series keeps their signs. Reproducing Opacus to 1e-6
    # would mean rewriting the RDP math, which we do not; we check the gap is that
    # small and on the conservative side.
    expected = 7.32911117143
    epsilon = _epsilon("rdp", 1.5, 0.04, steps_for_epochs(90, 0.04))
    assert epsilon == pytest.approx(expected, rel=5e-5)
    assert epsilon >= expected


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    [
        (1.1, 256 / 60000, 14063, 2.381779),
        (1.3, 150 / 60000, 6000, 0.640111),
    ],
)
def test_pld_epsilon_matches_dp_accounting_values(sigma, q, steps, expected):
    assert _epsilon("pld", sigma, q, steps) == pytest.approx(expected, rel=1e-5)


def test_pld_delta_matches_dp_accounting_test():
    # dp-accounting pld_privacy_accountant_test: q=0.2, σ=0.5, 3 steps, δ(ε=1) = 0.15594
    # (their own tolerance is 1e-3).
    accountant = PrivacyAccountant("pld")
    accountant.step(0.5, 0.2, 3)
    assert accountant.delta(1.0) == pytest.approx(0.15594, abs=2e-5)
    assert accountant.epsilon(0.15594) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected", "source"),
    [
        (1.5, 0.04, 2249, 6.777395712150674, "Opacus PRV accountant test"),
        (1.1, 256 / 60000, 14063, 2.391837, "prv-accountant upper bound"),
    ],
)
@requires_prv
def test_prv_epsilon_upper_bound_matches_published_values(sigma, q, steps, expected, source):
    assert _epsilon("prv", sigma, q, steps) == pytest.approx(expected, rel=1e-6), source


def test_mechanisms_order_as_theory_says_on_a_reference_setting():
    # PLD and PRV are near-exact, RDP is a looser upper bound.
    rdp = _epsilon("rdp", 1.1, 256 / 60000, 14063)
    pld = _epsilon("pld", 1.1, 256 / 60000, 14063)
    assert pld < rdp
    assert abs(pld - 2.391837) < 0.011  # within PRV's eps_error of the PRV upper bound
