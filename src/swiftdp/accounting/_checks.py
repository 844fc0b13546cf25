"""Input checks shared by the accounting package.

Every check raises :class:`~swiftdp.errors.InvalidArgumentError` with a message
that names the argument, the value seen, and how to fix it, e.g.
``Expected noise_multiplier >= 0, got -1.0. Pass a non-negative noise multiplier
(0 disables noise).``
"""

from __future__ import annotations

import math
import numbers

from swiftdp.errors import InvalidArgumentError

_SIGMA_FIX = "Pass a non-negative noise multiplier (0 disables noise)."
_RATE_FIX = (
    "Pass the probability that each example is in a step, e.g. expected_batch_size / dataset_size."
)
_DELTA_FIX = "Pass a small positive delta such as 1e-5, well below 1 / dataset_size."


def _as_real(value: object, name: str, fix: str) -> float:
    """Returns ``value`` as a float, refusing bools, strings and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"Expected {name} to be a real number, got {value!r} "
            f"(type {type(value).__name__}). {fix}"
        )
    number = float(value)
    if math.isnan(number):
        raise InvalidArgumentError(f"Expected {name} to be a number, got nan. {fix}")
    return number


def check_noise_multiplier(value: object) -> float:
    """Checks a noise multiplier σ: a finite real number >= 0.

    Args:
        value: The noise multiplier given by the user.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not a finite number >= 0.
    """
    sigma = _as_real(value, "noise_multiplier", _SIGMA_FIX)
    if sigma < 0:
        raise InvalidArgumentError(f"Expected noise_multiplier >= 0, got {value!r}. {_SIGMA_FIX}")
    if math.isinf(sigma):
        raise InvalidArgumentError(
            f"Expected a finite noise_multiplier, got {value!r}. {_SIGMA_FIX}"
        )
    return sigma


def check_sample_rate(value: object, *, allow_zero: bool = True) -> float:
    """Checks a sampling rate q: a probability in [0, 1] (or (0, 1]).

    Args:
        value: The sampling rate given by the user.
        allow_zero: Whether q = 0 (a step that reads no data) is accepted.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is outside the accepted interval.
    """
    rate = _as_real(value, "sample_rate", _RATE_FIX)
    low_ok = rate >= 0 if allow_zero else rate > 0
    if not (low_ok and rate <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidArgumentError(
            f"Expected sample_rate in {interval}, got {value!r}. {_RATE_FIX}"
        )
    return rate


def check_steps(value: object, *, name: str = "num_steps", minimum: int = 0) -> int:
    """Checks a step count: an int >= ``minimum``.

    Args:
        value: The step count given by the user.
        name: The argument name used in the error message.
        minimum: The smallest accepted count.

    Returns:
        ``value`` as an int.

    Raises:
        InvalidArgumentError: If ``value`` is not an int or is below ``minimum``.
    """
    fix = f"Pass the number of DP-SGD steps as an int >= {minimum}."
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"Expected {name} to be an int, got {value!r} (type {type(value).__name__}). {fix}"
        )
    steps = int(value)
    if steps < minimum:
        raise InvalidArgumentError(f"Expected {name} >= {minimum}, got {value!r}. {fix}")
    return steps


def check_delta(value: object) -> float:
    """Checks a target δ: a real number in (0, 1).

    Args:
        value: The δ given by the user.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not in (0, 1).
    """
    delta = _as_real(value, "delta", _DELTA_FIX)
    if not 0 < delta < 1:
        raise InvalidArgumentError(f"Expected delta in (0, 1), got {value!r}. {_DELTA_FIX}")
    return delta


def check_epsilon(value: object, *, name: str = "epsilon", allow_zero: bool = True) -> float:
    """Checks an ε: a finite real number >= 0 (or > 0).

    Args:
        value: The ε given by the user.
        name: The argument name used in the error message.
        allow_zero: Whether ε = 0 is accepted.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is negative (or zero), infinite or not a number.
    """
    fix = "Pass the privacy budget epsilon as a positive finite number, e.g. 8.0."
    eps = _as_real(value, name, fix)
    bound = ">= 0" if allow_zero else "> 0"
    if eps < 0 or (eps == 0 and not allow_zero):
        raise InvalidArgumentError(f"Expected {name} {bound}, got {value!r}. {fix}")
    if math.isinf(eps):
        raise InvalidArgumentError(f"Expected a finite {name}, got {value!r}. {fix}")
    return eps


def check_positive(value: object, *, name: str, fix: str) -> float:
    """Checks a finite real number > 0 (epochs, tolerance).

    Args:
        value: The number given by the user.
        name: The argument name used in the error message.
        fix: A sentence telling the user what to pass instead.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not a finite number > 0.
    """
    number = _as_real(value, name, fix)
    if not 0 < number < math.inf:
        raise InvalidArgumentError(f"Expected {name} > 0 and finite, got {value!r}. {fix}")
    return number
