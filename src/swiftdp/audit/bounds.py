"""Lower bounds on ε from one training run's canary guesses.

``m`` canaries are each included in the training set independently with
probability ½. After training, an auditor guesses, for ``r`` of them, whether
each was included (abstaining on the rest), and ``v`` guesses are right. If
the training run is (ε, δ)-DP, a guess is right with probability at most
``e^ε / (1 + e^ε)`` each, as for randomized response, so ``v`` is dominated by
a binomial (Steinke, Nasr, Jagielski 2023, Theorem 3.3):

    P[V ≥ v] ≤ P[Bin(r, e^ε/(1+e^ε)) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Bin(r, ·) < v] / i.

The lower bound is the largest ε whose p-value is below ``1 − confidence``:
an (ε', δ)-DP claim with ε' below it is refuted at that confidence.

The f-DP refinement (Mahloujifar, Melis, Chaudhuri 2025) holds the guesses
to the trade-off curve of a Gaussian mechanism instead of (ε, δ)'s two
lines: for the Gaussian mechanism of the same (ε, δ) (the claim as
DP-SGD makes it) it shows more from the same guesses. Its test here is the
recursion of their Algorithm "audit with reconstruction, capped": the
probabilities of ``v`` right and ``r − v`` wrong guesses are pushed down the
trade-off curve one wrong guess at a time; the claim is refuted when they
cannot account for ``r/m`` of the mass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
from scipy import optimize, stats

from swiftdp.errors import InvalidArgumentError

__all__ = ["best_guesses", "epsilon_lower_bound", "epsilon_lower_bound_fdp", "guess_counts",
           "p_value"]

_NORMAL = NormalDist()


def _check(m: int, guesses: int, correct: int, confidence: float, delta: float) -> None:
    if not (isinstance(m, int) and isinstance(guesses, int) and isinstance(correct, int)):
        raise InvalidArgumentError(
            f"m, guesses and correct must be ints, got {m!r}, {guesses!r}, {correct!r}.")
    if not 0 <= correct <= guesses <= m:
        raise InvalidArgumentError(
            f"Expected 0 <= correct <= guesses <= m, got correct={correct}, "
            f"guesses={guesses}, m={m}.")
    if not 0 < confidence < 1:
        raise InvalidArgumentError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    if not 0 <= delta < 1:
        raise InvalidArgumentError(f"`delta` must be in [0, 1), got {delta!r}.")


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """``P[V ≥ correct]`` under an (ε, δ)-DP run: Steinke et al.'s Theorem 3.3 bound.

    Args:
        m: canaries (each included with probability ½).
        guesses: guesses made (abstentions excluded).
        correct: right guesses.
        epsilon: the ε of the null hypothesis.
        delta: its δ.
    """
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[Bin >= correct]
    if delta == 0 or correct == 0:
        return min(1.0, tail)
    # max_i P[correct - i <= Bin < correct] / i, over i = 1..correct
    i = np.arange(1, correct + 1)
    below = stats.binom.cdf(correct - 1, guesses, q) - stats.binom.cdf(correct - 1 - i, guesses, q)
    alpha = float(np.max(below / i))
    return min(1.0, tail + 2 * m * delta * alpha)


def _largest(refutes: Callable[[float], bool]) -> float:
    """The largest ε ≥ 0 that ``refutes`` (monotone: true below a point), or 0."""
    if not refutes(0.0):
        return 0.0
    hi = 1.0
    while refutes(hi):
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    lo = hi / 2 if hi > 1.0 else 0.0
    return float(optimize.brentq(lambda e: 0.5 - float(refutes(e)), lo, hi, xtol=1e-6))


def epsilon_lower_bound(m: int, guesses: int, correct: int, *, confidence: float = 0.95,
                        delta: float = 0.0) -> float:
    """The ε that ``correct`` right guesses out of ``guesses`` prove, at ``confidence``.

    Steinke, Nasr, Jagielski (2023): no (ε', δ)-DP run with ε' below the
    result shows this many right guesses except with probability
    ``1 − confidence``.

    Example:
        >>> round(epsilon_lower_bound(1000, 100, 100), 2)  # 100 right of 100
        3.48

    Raises:
        InvalidArgumentError: counts out of order, confidence or δ out of range.
    """
    _check(m, guesses, correct, confidence, delta)
    beta = 1.0 - confidence
    return _largest(lambda e: p_value(m, guesses, correct, e, delta) < beta)


@functools.lru_cache(maxsize=256)
def _gaussian_mu(epsilon: float, delta: float) -> float:
    """μ of the Gaussian mechanism (sensitivity 1, σ = 1/μ) that is exactly (ε, δ)-DP."""
    if delta <= 0:
        return math.inf if epsilon == math.inf else 0.0

    def delta_of(mu: float) -> float:  # the Gaussian mechanism's δ(ε) (Balle & Wang 2018)
        return float(stats.norm.cdf(-epsilon / mu + mu / 2)
                     - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2))

    hi = 1.0
    while delta_of(hi) < delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(lambda mu: delta_of(mu) - delta, 1e-12, hi, xtol=1e-12))


def _refutes_gaussian(m: int, guesses: int, correct: int, beta: float, mu: float) -> bool:
    """Whether the guesses refute μ-GDP at significance ``beta`` (Mahloujifar et al.'s test)."""
    if mu == math.inf:
        return False
    # f⁻¹ of the Gaussian trade-off curve: Φ(Φ⁻¹(x) − μ) (pure Python: called per guess)
    def inverse(x: float) -> float:
        if x <= 0.0 or x >= 1.0:
            return float(x >= 1.0)
        return _NORMAL.cdf(_NORMAL.inv_cdf(x) - mu)

    wrong = guesses - correct
    r, h = beta * correct / m, beta * wrong / m
    for i in range(correct - 1, -1, -1):
        h_next = max(h, inverse(r))
        if h_next == h:
            break
        r = min(r + (i / (guesses - i)) * (h_next - h), 1.0)
        h = h_next
    return r + h > guesses / m


def epsilon_lower_bound_fdp(m: int, guesses: int, correct: int, *, confidence: float = 0.95,
                            delta: float = 1e-5) -> float:
    """The f-DP version: the largest ε whose Gaussian mechanism at (ε, δ) the guesses refute.

    Mahloujifar, Melis, Chaudhuri (2025): the claim tested is the trade-off
    curve of the Gaussian mechanism that is exactly (ε, δ)-DP, which DP-SGD's
    own curve is close to; the same guesses refute a larger ε than
    :func:`epsilon_lower_bound`'s two-line (ε, δ) claim.

    Raises:
        InvalidArgumentError: counts out of order, confidence or δ out of range
            (δ must be > 0: the Gaussian mechanism has none at δ = 0).
    """
    _check(m, guesses, correct, confidence, delta)
    if delta <= 0:
        raise InvalidArgumentError(
            "`delta` must be > 0 for the f-DP bound (no Gaussian mechanism is (ε, 0)-DP).")
    beta = 1.0 - confidence
    return _largest(lambda e: _refutes_gaussian(m, guesses, correct, beta, _gaussian_mu(e, delta)))


def guess_counts(m: int) -> tuple[int, ...]:
    """The numbers of guesses tried on ``m`` canaries: 1, 2, 5 × powers of ten up to ``m``."""
    out = []
    k = 1
    while k <= m:
        for f in (1, 2, 5):
            if f * k <= m:
                out.append(f * k)
        k *= 10
    if m not in out:
        out.append(m)
    return tuple(sorted(set(out)))


def best_guesses(scores: np.ndarray, included: np.ndarray, *, confidence: float, delta: float,
                 fdp: bool) -> tuple[float, int, int]:
    """The largest bound over the guess counts, each tested at a Bonferroni-corrected level.

    The auditor guesses "included" for the ``k`` highest scores (a one-sided
    guess: DP-SGD's canaries raise their score when included); every ``k``
    of :func:`guess_counts` is tried, each at significance ``(1 −
    confidence) / n_k``, so the best of them still holds at ``confidence``.

    Returns:
        ``(ε, guesses, correct)`` of the best count.
    """
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(included[order].astype(np.int64))
    counts = guess_counts(m)
    level = 1.0 - (1.0 - confidence) / len(counts)
    best = (0.0, 0, 0)
    for k in counts:
        v = int(hits[k - 1])
        eps = (epsilon_lower_bound_fdp(m, k, v, confidence=level, delta=delta) if fdp
               else epsilon_lower_bound(m, k, v, confidence=level, delta=delta))
        if eps > best[0]:
            best = (eps, k, v)
    return best
