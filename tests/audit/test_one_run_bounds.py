"""The one-run bounds against values computed independently (scipy's binomial tails).

Steinke, Nasr, Jagielski (2023): with ``r`` guesses of which ``v`` are right
among ``m`` canaries, an (ε, δ)-DP run gives ``P[V ≥ v] ≤ P[Bin(r, e^ε/(1+e^ε)) ≥ v]
+ 2mδ·max_i P[v − i ≤ Bin < v]/i``; the lower bound is the ε where that
p-value reaches ``1 − confidence``. The f-DP refinement is held to validity
(never above the true ε of a simulated Gaussian mechanism) and to being at
least as tight on the same scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from swiftdp.audit.bounds import (
    best_guesses,
    epsilon_lower_bound,
    epsilon_lower_bound_fdp,
    guess_counts,
    p_value,
)
from swiftdp.errors import InvalidArgumentError


def _q(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


@pytest.mark.parametrize(("m", "r", "v"), [(1000, 100, 100), (1000, 1000, 600), (500, 200, 150),
                                           (100, 10, 9)])
def test_the_bound_at_delta_zero_is_where_the_binomial_tail_reaches_the_significance(m, r, v):
    eps = epsilon_lower_bound(m, r, v, confidence=0.95)
    if eps == 0.0:
        assert stats.binom.sf(v - 1, r, 0.5) >= 0.05
        return
    assert stats.binom.sf(v - 1, r, _q(eps)) == pytest.approx(0.05, rel=1e-3)


def test_all_guesses_right_has_the_closed_form():
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)  # q^r = 0.05
        assert epsilon_lower_bound(10_000, r, r) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (1000, 100, 90, 1.0, 1e-5), (1000, 500, 400, 0.5, 1e-4), (200, 50, 50, 2.0, 1e-3)])
def test_the_p_value_with_delta_matches_an_explicit_sum(m, r, v, eps, delta):
    q = _q(eps)
    tail = sum(stats.binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(sum(stats.binom.pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, tail + 2 * m * delta * alpha),
                                                         rel=1e-9, abs=1e-300)


def test_delta_only_lowers_the_bound_and_no_evidence_gives_zero():
    assert epsilon_lower_bound(1000, 200, 180, delta=1e-5) <= epsilon_lower_bound(1000, 200, 180)
    assert epsilon_lower_bound(1000, 200, 100) == 0.0  # chance level
    assert epsilon_lower_bound_fdp(1000, 200, 100) == 0.0


def _eps_of_gaussian(mu: float, delta: float) -> float:
    def excess(e: float) -> float:
        return float(stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)
                     - delta)
    return float(optimize.brentq(excess, 0.0, 200.0))


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_bounds_never_exceed_the_true_epsilon_of_a_simulated_gaussian_mechanism(mu):
    """m canaries each shifting its score by μ (μ-GDP per canary): the true ε is known."""
    rng = np.random.default_rng(int(mu * 10))
    true_eps = _eps_of_gaussian(mu, 1e-5)
    steinke, fdp = [], []
    for _ in range(12):
        included = rng.random(1000) < 0.5
        scores = rng.normal(size=1000) + mu * included
        steinke.append(best_guesses(scores, included, confidence=0.95, delta=1e-5, fdp=False)[0])
        fdp.append(best_guesses(scores, included, confidence=0.95, delta=1e-5, fdp=True)[0])
    assert max(steinke) < true_eps and max(fdp) < true_eps
    assert np.mean(fdp) > np.mean(steinke) > 0.5  # the f-DP test sees more, both see something


def test_guess_counts_cover_one_to_m():
    assert guess_counts(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert guess_counts(30)[-1] == 30


def test_bad_counts_are_refused():
    with pytest.raises(InvalidArgumentError, match="correct <= guesses <= m"):
        epsilon_lower_bound(10, 20, 5)
    with pytest.raises(InvalidArgumentError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, confidence=1.0)
    with pytest.raises(InvalidArgumentError, match="delta"):
        epsilon_lower_bound_fdp(10, 5, 5, delta=0.0)
