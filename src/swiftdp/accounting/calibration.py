"""Calibration: the noise multiplier that meets a privacy budget, and exact step counts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from fractions import Fraction

from swiftdp.accounting.history import AccountingSegment
from swiftdp.accounting.mechanisms import Mechanism, make_mechanism
from swiftdp.checks import (
    check_delta,
    check_epsilon,
    check_positive,
    check_sample_rate,
    check_steps,
)
from swiftdp.errors import InvalidArgumentError

MAX_NOISE_MULTIPLIER = 1e4
"""The largest σ tried; a budget that needs more is reported as unreachable."""

MIN_NOISE_MULTIPLIER = 1e-3
"""Below this σ the search brackets with σ = 0 (no noise, ε = inf) instead of halving on."""

_CHEAP_MECHANISMS = ("rdp", "gdp")
"""Mechanisms searched directly; the others start from RDP's σ."""

_MAX_ITERATIONS = 200
_INTEGER_SNAP = 1e-12


def _exact(value: float | Fraction) -> Fraction:
    """The rational number a user meant: floats are read through their shortest decimal form."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, numbers.Integral):
        return Fraction(int(value))
    return Fraction(repr(float(value)))


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """The number of steps that ``epochs`` passes over the data take at sampling rate q.

    Exact: ``epochs / sample_rate`` is computed in rational arithmetic on the
    numbers as written (a float is read through its shortest decimal form, so
    0.04 is exactly 1/25), never in binary floating point, where 90 / 0.04
    happens to round to 2250 but 90 // 0.04 is 2249. A ratio within 1e-12
    (relative) of an integer is that integer, which absorbs the representation
    error of rates such as 1/3 (0.3333333333333333); any other ratio is
    rounded up, so the accounting covers every step of the last, partial
    epoch (more steps only ever over-state ε).

    Args:
        epochs: Number of passes over the data, > 0.
        sample_rate: Poisson sampling rate q in (0, 1] (expected batch size
            over dataset size).

    Returns:
        The step count, >= 1.

    Raises:
        InvalidArgumentError: If ``epochs`` is not > 0 or ``sample_rate`` is not in (0, 1].

    Example:
        >>> steps_for_epochs(90, 0.04)
        2250
        >>> steps_for_epochs(15, 150 / 60000)
        6000
    """
    check_positive(epochs, name="epochs", fix="Pass the number of passes over the data, e.g. 90.")
    check_sample_rate(sample_rate, allow_zero=False)
    ratio = _exact(epochs) / _exact(sample_rate)
    nearest = round(ratio)
    if nearest >= 1 and abs(ratio - nearest) <= _INTEGER_SNAP * ratio:
        return int(nearest)
    return max(1, math.ceil(ratio))


def _unreachable(
    target_epsilon: float, delta: float, rate: float, steps: int, reached: float
) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier="
        f"{MAX_NOISE_MULTIPLIER:g} spends epsilon={reached:.6g} at delta={delta} with "
        f"sample_rate={rate} over {steps} steps. Use a larger target_epsilon, fewer steps or "
        "epochs, or a smaller sample_rate (more data for the same batch size)."
    )


def _search(
    epsilon_of: Callable[[float], float],
    target: float,
    tolerance: float,
    start: float = 1.0,
    factor: float = 2.0,
) -> tuple[float, float]:
    """Smallest σ with target - tolerance <= ε(σ) <= target, keeping ε(σ) <= target always.

    Invariant: ε(lo) > target >= ε(hi). Steps interpolate log ε linearly in
    log σ (Illinois false position), aiming at target - tolerance / 2, inside
    the accepted window; they bisect while ε(lo) is infinite.

    The bracket is found by stepping from ``start`` by ``factor`` (up while ε
    is over the target, down while it is not).

    Returns:
        ``(σ, ε(σ))``; ``σ = math.inf`` with the ε at MAX_NOISE_MULTIPLIER when
        even that σ is not enough.
    """
    hi, eps_hi = start, epsilon_of(start)
    lo, eps_lo = 0.0, math.inf
    if eps_hi > target:
        while eps_hi > target:
            if hi >= MAX_NOISE_MULTIPLIER:
                return math.inf, eps_hi
            lo, eps_lo = hi, eps_hi
            hi = min(factor * hi, MAX_NOISE_MULTIPLIER)
            eps_hi = epsilon_of(hi)
    else:
        while hi / factor >= MIN_NOISE_MULTIPLIER:
            lo, eps_lo = hi / factor, epsilon_of(hi / factor)
            if eps_lo > target:
                break
            hi, eps_hi = lo, eps_lo
            lo, eps_lo = 0.0, math.inf
    aim = target - tolerance / 2
    # Illinois false position on f(x) = log ε(e^x) - log aim, x = log σ: f(lo) > 0 > f(hi)
    # whenever the loop goes on. When one end is kept twice, its f is halved.
    f_lo = f_hi = 0.0
    stale_lo = stale_hi = 0
    for _ in range(_MAX_ITERATIONS):
        if target - eps_hi <= tolerance or hi - lo <= 1e-12 * hi:
            break
        width = hi - lo
        if lo > 0 and math.isfinite(eps_lo) and eps_hi > 0 and aim > 0:
            f_lo = (math.log(eps_lo) - math.log(aim)) / 2.0 ** max(0, stale_lo - 1)
            f_hi = (math.log(eps_hi) - math.log(aim)) / 2.0 ** max(0, stale_hi - 1)
            x_lo, x_hi = math.log(lo), math.log(hi)
            sigma = math.exp(x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo))
            sigma = min(max(sigma, lo + 0.001 * width), hi - 0.001 * width)
        else:
            sigma = lo + width / 2
        eps = epsilon_of(sigma)
        if eps <= target:
            hi, eps_hi = sigma, eps
            stale_hi, stale_lo = 0, stale_lo + 1
        else:
            lo, eps_lo = sigma, eps
            stale_lo, stale_hi = 0, stale_hi + 1
    return hi, eps_hi


def get_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    mechanism: str = "pld",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier σ whose ε stays within ``target_epsilon``.

    Searches σ for ``steps`` Poisson-sampled Gaussian steps at rate q. The
    returned σ is guaranteed to satisfy ε(σ) <= target_epsilon with the same
    mechanism a :class:`~swiftdp.accounting.PrivacyAccountant` uses (never
    above the target), and is the smallest such σ up to ``tolerance``:
    ``target_epsilon - tolerance <= ε(σ) <= target_epsilon`` (Opacus'
    ``epsilon_tolerance``), except that the search stops, still on the safe
    side, if σ is pinned down to 1e-12 relative first.

    The search runs on the cheap RDP accountant first; for ``"pld"`` and
    ``"prv"`` its σ (an upper guess, RDP being looser) seeds a narrow bracket,
    so only a handful of PLD/PRV evaluations are needed (about 2 s for PLD at
    2250 steps, 6 s for PRV). ``"gdp"``, closed form, is searched directly
    (milliseconds).

    With ``"gdp"`` the σ meets the target by the GDP-CLT approximation only,
    which can under-state ε (see :mod:`swiftdp.accounting.gdp`): the true ε
    of the run may exceed ``target_epsilon``.

    Args:
        target_epsilon: The privacy budget ε, > 0.
        delta: The target δ in (0, 1).
        sample_rate: Poisson sampling rate q in (0, 1].
        steps: Number of steps; give exactly one of ``steps`` and ``epochs``.
        epochs: Number of passes over the data; steps are
            :func:`steps_for_epochs` ``(epochs, sample_rate)``.
        mechanism: ``"pld"`` (default), ``"rdp"``, ``"prv"`` or ``"gdp"``
            (an approximation, not a bound; warns).
        tolerance: How far below the target ε(σ) may land, > 0.

    Returns:
        The noise multiplier σ.

    Raises:
        InvalidArgumentError: If an argument is out of range, if both or
            neither of ``steps`` and ``epochs`` are given, or if the target is
            unreachable even with σ = 1e4 (the message gives the ε reached).

    Example:
        >>> sigma = get_noise_multiplier(8.0, 1e-5, 0.04, epochs=90, mechanism="rdp")
        >>> round(sigma, 2)
        1.42

    References:
        Opacus, ``opacus.accountants.utils.get_noise_multiplier``;
        dp_accounting, ``mechanism_calibration.calibrate_dp_mechanism``.
    """
    target = check_epsilon(target_epsilon, name="target_epsilon", allow_zero=False)
    delta = check_delta(delta)
    rate = check_sample_rate(sample_rate, allow_zero=False)
    tol = check_positive(
        tolerance,
        name="tolerance",
        fix="Pass how far below target_epsilon the result may land, e.g. 0.01.",
    )
    if (steps is None) == (epochs is None):
        raise InvalidArgumentError(
            f"Expected exactly one of steps and epochs, got steps={steps!r} and epochs={epochs!r}. "
            "Pass steps=<number of DP-SGD steps> or epochs=<passes over the data>."
        )
    if steps is not None:
        num_steps = check_steps(steps, name="steps", minimum=1)
    else:
        num_steps = steps_for_epochs(epochs, rate)  # type: ignore[arg-type]
    engine = make_mechanism(mechanism)

    def epsilon_of(sigma: float, on: Mechanism = engine) -> float:
        history = (AccountingSegment(sigma, rate, num_steps),)
        try:
            return on.epsilon(history, delta)
        except (OverflowError, RuntimeError, FloatingPointError):
            # The library could not bound ε here (PRV at tiny σ); treat the
            # point as over budget, which only ever pushes σ up.
            return math.inf

    if engine.name in _CHEAP_MECHANISMS:
        sigma, reached = _search(epsilon_of, target, tol)
    else:
        # RDP is cheap, and its σ is a close upper guess for PLD and PRV (which
        # are tighter), so it seeds their search with a narrow bracket.
        rdp_engine = make_mechanism("rdp")
        sigma, reached = _search(lambda s: epsilon_of(s, rdp_engine), target, tol)
        if math.isfinite(sigma):
            sigma, reached = _search(epsilon_of, target, tol, start=sigma, factor=1.1)
        else:
            sigma, reached = _search(epsilon_of, target, tol)
    if not math.isfinite(sigma):
        raise _unreachable(target, delta, rate, num_steps, reached)
    return sigma
