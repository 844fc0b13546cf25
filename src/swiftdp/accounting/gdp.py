"""Gaussian differential privacy (GDP) by the central limit theorem: μ, then (ε, δ).

The ``"gdp"`` accountant replaces the history by one Gaussian trade-off
function G_μ and reads (ε, δ) off it. Two closed-form steps, as in Opacus'
``GaussianAccountant`` (Poisson sampling):

1. μ of the history (central limit theorem of Bu et al., one μ per segment,
   segments composed as GDP composes, μ² adding up)::

       μ = sqrt( Σ_segments  steps · q² · (exp(1 / σ²) − 1) )

2. (ε, δ) of μ-GDP (Dong, Roth, Su, Corollary 2.13)::

       δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2)

   and ε(δ) is the root of δ(ε) = δ, found by Brent's method (δ(ε) falls
   strictly from δ(0) = 2Φ(μ/2) − 1 to 0).

APPROXIMATION, NOT A BOUND. Step 1 is a limit (q → 0 and steps → ∞ with
q·sqrt(steps) fixed), not an inequality: for a finite run it can report less
ε than the mechanism really spends, most for few steps and large q (Gopi,
Lee, Wutschitz 2021 show it under-reporting next to exact PRV accounting).
Opacus warns: "GDP accounting is experimental and can underestimate privacy
expenditure. Proceed with caution." Use ``"pld"`` or ``"prv"`` for an ε
that is a guarantee; use ``"gdp"`` to compare with GDP-CLT numbers.

References:
    Bu, Dong, Long, Su, "Deep Learning with Gaussian Differential Privacy",
    Harvard Data Science Review 2020, https://arxiv.org/abs/1911.11607.
    Dong, Roth, Su, "Gaussian Differential Privacy", JRSS B 2022,
    https://arxiv.org/abs/1905.02383.
    Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy",
    NeurIPS 2021, https://arxiv.org/abs/2106.02848.
    Opacus, ``opacus.accountants.analysis.gdp``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from scipy import optimize, special

from swiftdp.accounting.history import AccountingSegment

GDP_WARNING = (
    "accountant 'gdp' (Gaussian DP by the central limit theorem) is an approximation, "
    "not an upper bound: it can report less epsilon than the training really spends, "
    "most for few steps or a large sample_rate (Gopi, Lee, Wutschitz 2021, "
    "https://arxiv.org/abs/2106.02848; Opacus calls it experimental). Use accountant='pld' "
    "or 'prv' for an epsilon that is a guarantee."
)
"""The warning a ``"gdp"`` accountant gives when it is created."""

_LARGEST_EXP_ARGUMENT = 709.0  # math.exp overflows just above 709.78


def clt_mu(segments: Iterable[AccountingSegment]) -> float:
    """The μ of GDP-CLT for Poisson-sampled Gaussian steps (an approximation, see the module).

    Args:
        segments: The steps, as segments of (σ, q, steps); order does not matter.

    Returns:
        ``sqrt(Σ steps · q² · (exp(1/σ²) − 1))``: 0 for no segments or q = 0
        only, ``math.inf`` if a segment has σ = 0 and q > 0 or if exp(1/σ²)
        overflows (σ below about 0.0375).

    References:
        Bu, Dong, Long, Su 2020, https://arxiv.org/abs/1911.11607.
    """
    mu_squared = 0.0
    for segment in segments:
        q = segment.sample_rate
        if q == 0:
            continue
        sigma = segment.noise_multiplier
        if sigma == 0 or 1.0 / sigma**2 > _LARGEST_EXP_ARGUMENT:
            return math.inf
        mu_squared += segment.steps * q * q * math.expm1(1.0 / sigma**2)
    return math.sqrt(mu_squared)


def gdp_delta(mu: float, epsilon: float) -> float:
    """The δ at ``epsilon`` of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).

    The second term is computed as exp(ε + log Φ(·)), so it neither overflows
    nor loses precision at large ε.

    Args:
        mu: μ >= 0 (``math.inf`` allowed).
        epsilon: ε >= 0.

    Returns:
        δ in [0, 1]: 0 for μ = 0, 1 for μ = inf.

    References:
        Dong, Roth, Su 2022, Corollary 2.13, https://arxiv.org/abs/1905.02383.
    """
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = float(special.ndtr(-epsilon / mu + mu / 2))
    exponent = epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2))
    # Analytically ≤ first; at huge ε and μ (σ ≲ 0.04) the two terms cancel in
    # floating point and the exponent can overflow: δ is then 0 to any precision.
    second = math.exp(exponent) if exponent < 700 else math.inf
    return min(1.0, max(0.0, first - second))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at ``delta`` of μ-GDP: the root of :func:`gdp_delta` (μ, ε) = δ.

    Args:
        mu: μ >= 0 (``math.inf`` allowed).
        delta: δ in (0, 1).

    Returns:
        ε >= 0: 0 when δ >= δ(0) = 2Φ(μ/2) − 1 (μ-GDP already gives (0, δ)),
        ``math.inf`` for μ = inf.

    Example:
        >>> mu = clt_mu([AccountingSegment(1.1, 256 / 60000, 14063)])  # MNIST, 60 epochs
        >>> round(mu, 4), round(gdp_epsilon(mu, 1e-5), 4)  # Opacus: 2.3244
        (0.5736, 2.3244)

    References:
        Dong, Roth, Su 2022, Corollary 2.13, https://arxiv.org/abs/1905.02383;
        Opacus, ``opacus.accountants.analysis.gdp.eps_from_mu``.
    """
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0

    def excess(epsilon: float) -> float:
        return gdp_delta(mu, epsilon) - delta

    # At ε = μ²/2 + tμ the first term is Φ(−t), so t = −Φ⁻¹(δ) puts δ(ε) below δ.
    upper = mu * mu / 2 + mu * max(0.0, -float(special.ndtri(delta))) + 1.0
    while math.isfinite(upper) and excess(upper) > 0:  # only if round-off misplaced it
        upper *= 2
    if not math.isfinite(upper):
        return math.inf
    return float(optimize.brentq(excess, 0.0, upper, xtol=1e-15, maxiter=500))
