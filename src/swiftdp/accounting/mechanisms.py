"""Accounting mechanisms: turn a history of DP-SGD steps into (ε, δ).

Each mechanism is a thin, cached wrapper around a maintained library; none of
the accounting math is reimplemented here, except GDP's two closed-form
formulas (:mod:`swiftdp.accounting.gdp`).

- ``"pld"``: privacy loss distributions (``dp_accounting.pld``), pessimistic
  discretisation with ``value_discretization_interval = 1e-4``, the library
  default. Tight and the default.
- ``"rdp"``: Rényi DP (``dp_accounting.rdp``) with the library's default
  orders and its improved RDP-to-(ε, δ) conversion. Loosest, fastest.
- ``"prv"``: privacy random variables (``prv_accountant``), reporting the
  upper bound of its ε interval, with Opacus' settings ``eps_error = 0.01``
  and ``delta_error = δ / 1000``. Needs the optional ``prv-accountant``
  package (``pip install 'swiftdp[prv]'``).
- ``"gdp"``: Gaussian DP by the central limit theorem (Bu et al. 2020), as
  Opacus' ``GaussianAccountant`` with Poisson sampling, for any history. AN
  APPROXIMATION, NOT AN UPPER BOUND: it can under-report ε (few steps, large
  q), and warns so when created. See :mod:`swiftdp.accounting.gdp`.

Every ε or δ is a deterministic function of the merged history, so the same
history always gives the same number, bit for bit, whatever order the
results were asked for in.

References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016.
    Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled
    Gaussian Mechanism", 2019, https://arxiv.org/abs/1908.10530.
    Doroshenko et al., "Connect the Dots: Tighter Discrete Approximations of
    Privacy Loss Distributions", 2022, https://arxiv.org/abs/2207.04380.
    Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy",
    2021, https://arxiv.org/abs/2106.02848.
    Bu, Dong, Long, Su, "Deep Learning with Gaussian Differential Privacy",
    2020, https://arxiv.org/abs/1911.11607.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from swiftdp.accounting.gdp import GDP_WARNING, clt_mu, gdp_delta, gdp_epsilon
from swiftdp.accounting.history import AccountingSegment, History
from swiftdp.errors import InvalidArgumentError

MECHANISMS: tuple[str, ...] = ("pld", "rdp", "prv", "gdp")
"""Names accepted by ``PrivacyAccountant(mechanism=...)``; the first is the default."""

PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
"""dp_accounting's default: matches published PLD values to ~1e-7 relative."""

RDP_ORDERS: tuple[float, ...] = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_PER_DELTA = 1e-3
PRV_DELTA_ERROR_FOR_DELTA_QUERIES = 1e-10


class _LRU:
    """A small least-recently-used cache (dict with a size bound)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)


def segment_event(segment: AccountingSegment) -> dp_accounting.DpEvent:
    """The dp_accounting event of one segment: Poisson-sampled Gaussian, self-composed.

    Args:
        segment: The segment.

    Returns:
        ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``.
    """
    step = dp_accounting.PoissonSampledDpEvent(
        segment.sample_rate, dp_accounting.GaussianDpEvent(segment.noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, segment.steps)


def history_event(history: History) -> dp_accounting.DpEvent:
    """The dp_accounting event of a whole history (segments composed in order).

    Args:
        history: The history.

    Returns:
        A ``ComposedDpEvent`` any dp_accounting accountant can take.
    """
    return dp_accounting.ComposedDpEvent([segment_event(s) for s in history])


class Mechanism:
    """Base class: input handling and result caching shared by all mechanisms."""

    name = ""

    def __init__(self) -> None:
        self._epsilons = _LRU(64)
        self._deltas = _LRU(64)

    def epsilon(self, history: History, delta: float) -> float:
        """The ε of ``history`` at ``delta`` (0 if it reads no data, inf if it adds no noise)."""
        return self._cached(self._epsilons, history, delta, math.inf,
                            lambda active: max(0.0, float(self._epsilon(active, delta))))

    def delta(self, history: History, epsilon: float) -> float:
        """The δ of ``history`` at ``epsilon`` (0 if it reads no data, 1 if it adds no noise)."""
        return self._cached(self._deltas, history, epsilon, 1.0,
                            lambda active: min(1.0, max(0.0, float(self._delta(active, epsilon)))))

    @staticmethod
    def _cached(cache: _LRU, history: History, arg: float, no_noise: float,
                compute: Callable[[History], float]) -> float:
        """Cached value for ``(history, arg)``: 0 without data access, ``no_noise`` without noise."""
        key = (history, arg)
        cached = cache.get(key)
        if cached is not None:
            return float(cached)
        active = tuple(s for s in history if s.costs_privacy)
        if not active:
            value = 0.0
        elif not all(s.is_private for s in active):
            value = no_noise
        else:
            value = compute(active)
        cache.put(key, value)
        return value

    def _epsilon(self, active: History, delta: float) -> float:
        raise NotImplementedError

    def _delta(self, active: History, epsilon: float) -> float:
        raise NotImplementedError


class RdpMechanism(Mechanism):
    """Rényi DP accounting with ``dp_accounting.rdp`` (cost independent of the step count).

    The RDP of one step is computed once per (σ, q) by a fresh
    ``RdpAccountant``; the history's RDP is Σ steps · RDP(one step), summed in
    history order exactly as ``RdpAccountant`` composes a ``ComposedDpEvent``.
    """

    name = "rdp"

    def __init__(self) -> None:
        super().__init__()
        self._orders = np.asarray(RDP_ORDERS, dtype=np.float64)
        self._one_step = _LRU(256)

    def _rdp_of_one_step(self, segment: AccountingSegment) -> np.ndarray:
        key = (segment.noise_multiplier, segment.sample_rate)
        rdp = self._one_step.get(key)
        if rdp is None:
            accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
            accountant.compose(segment_event(AccountingSegment(*key, steps=1)))
            # dp-accounting has no public getter for the RDP curve; `_rdp` has
            # held it since the library's first release (pinned: 0.6.0).
            rdp = np.array(accountant._rdp, dtype=np.float64)
            self._one_step.put(key, rdp)
        return rdp

    def _total_rdp(self, active: History) -> np.ndarray:
        total = np.zeros_like(self._orders)
        for segment in active:
            total += segment.steps * self._rdp_of_one_step(segment)
        return total

    def _epsilon(self, active: History, delta: float) -> float:
        return float(
            rdp_privacy_accountant.compute_epsilon(self._orders, self._total_rdp(active), delta)[0]
        )

    def _delta(self, active: History, epsilon: float) -> float:
        return float(
            rdp_privacy_accountant.compute_delta(self._orders, self._total_rdp(active), epsilon)[0]
        )


class PldMechanism(Mechanism):
    """PLD accounting with ``dp_accounting.pld``, composing incrementally.

    Computes exactly what ``PLDAccountant`` computes for the history's
    ``ComposedDpEvent`` (identity, then each segment's one-step PLD
    self-composed ``steps`` times, in order), but caches the one-step PLD per
    (σ, q) and the composed PLD of recent history prefixes, so that adding
    steps to the last segment only redoes the last segment.
    """

    name = "pld"

    def __init__(self) -> None:
        super().__init__()
        self._one_step = _LRU(8)
        self._composed = _LRU(4)

    def _pld_of_one_step(self, segment: AccountingSegment) -> Any:
        key = (segment.noise_multiplier, segment.sample_rate)
        pld = self._one_step.get(key)
        if pld is None:
            pld = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=segment.noise_multiplier,
                value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
                sampling_prob=segment.sample_rate,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
            self._one_step.put(key, pld)
        return pld

    def _pld(self, active: History) -> Any:
        composed = self._composed.get(active)
        if composed is not None:
            return composed
        prefix = active[:-1]
        composed = self._composed.get(prefix) if prefix else None
        if composed is None:
            composed = privacy_loss_distribution.identity(
                value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL
            )
            for segment in prefix:
                composed = composed.compose(
                    self._pld_of_one_step(segment).self_compose(segment.steps)
                )
            if prefix:
                self._composed.put(prefix, composed)
        last = active[-1]
        composed = composed.compose(self._pld_of_one_step(last).self_compose(last.steps))
        self._composed.put(active, composed)
        return composed

    def _epsilon(self, active: History, delta: float) -> float:
        return float(self._pld(active).get_epsilon_for_delta(delta))

    def _delta(self, active: History, epsilon: float) -> float:
        return float(self._pld(active).get_delta_for_epsilon(epsilon))


class PrvMechanism(Mechanism):
    """PRV accounting with ``prv_accountant``; reports the upper end of its ε interval.

    The discretisation depends on the total step count and on δ, so nothing
    but the final results can be cached: each new history costs a fresh
    computation (about 1 s for 2000 steps).
    """

    name = "prv"

    def __init__(self) -> None:
        super().__init__()
        try:
            import prv_accountant
        except ImportError as err:
            raise InvalidArgumentError(
                "Expected mechanism 'prv' to find the package prv-accountant, which is not "
                "installed. Install it with `pip install 'swiftdp[prv]'`, or use "
                "mechanism='pld' (as tight, no extra dependency)."
            ) from err
        self._prv = prv_accountant

    def _accountant(self, active: History, delta_error: float) -> Any:
        prvs = [
            self._prv.PoissonSubsampledGaussianMechanism(
                sampling_probability=s.sample_rate, noise_multiplier=s.noise_multiplier
            )
            for s in active
        ]
        return self._prv.PRVAccountant(
            prvs=prvs,
            eps_error=PRV_EPS_ERROR,
            delta_error=delta_error,
            max_self_compositions=[s.steps for s in active],
        )

    def _epsilon(self, active: History, delta: float) -> float:
        accountant = self._accountant(active, delta * PRV_DELTA_ERROR_PER_DELTA)
        _, _, upper = accountant.compute_epsilon(delta, [s.steps for s in active])
        return float(upper)

    def _delta(self, active: History, epsilon: float) -> float:
        accountant = self._accountant(active, PRV_DELTA_ERROR_FOR_DELTA_QUERIES)
        _, _, upper = accountant.compute_delta(epsilon, [s.steps for s in active])
        return float(upper)


class GdpMechanism(Mechanism):
    """GDP-CLT accounting: μ of the history, then ε or δ of μ-GDP (closed form).

    An approximation, not an upper bound (see :mod:`swiftdp.accounting.gdp`);
    creating one gives a ``UserWarning`` that says so. For a history of one
    segment it is Opacus' ``GaussianAccountant`` (``poisson=True``); a history
    of several segments has μ² = Σ of the segments' μ².
    """

    name = "gdp"

    def __init__(self) -> None:
        super().__init__()
        # stacklevel 4: GdpMechanism <- make_mechanism <- PrivacyAccountant or
        # get_noise_multiplier <- the caller that chose "gdp".
        warnings.warn(GDP_WARNING, UserWarning, stacklevel=4)

    def _epsilon(self, active: History, delta: float) -> float:
        return gdp_epsilon(clt_mu(active), delta)

    def _delta(self, active: History, epsilon: float) -> float:
        return gdp_delta(clt_mu(active), epsilon)


_MECHANISM_TYPES: dict[str, type[Mechanism]] = {
    "pld": PldMechanism,
    "rdp": RdpMechanism,
    "prv": PrvMechanism,
    "gdp": GdpMechanism,
}


def make_mechanism(name: object) -> Mechanism:
    """Creates the accounting mechanism called ``name``.

    Args:
        name: One of :data:`MECHANISMS`.

    Returns:
        A fresh mechanism with empty caches.

    Raises:
        InvalidArgumentError: If ``name`` is unknown, or is ``"prv"`` and
            prv-accountant is not installed.

    Warns:
        UserWarning: For ``"gdp"``, that its ε is an approximation, not a bound.
    """
    if not isinstance(name, str) or name not in _MECHANISM_TYPES:
        choices = ", ".join(repr(m) for m in MECHANISMS)
        raise InvalidArgumentError(
            f"Expected mechanism to be one of {choices}, got {name!r}. "
            f"Pass mechanism={MECHANISMS[0]!r} (tight, the default), 'rdp' (fast, looser), "
            "'prv' or 'gdp' (an approximation, not a bound)."
        )
    return _MECHANISM_TYPES[name]()
