"""Input checks shared by the sampling layer.

Every check raises :class:`~swiftdp.errors.InvalidArgumentError` with a message
that names the argument, the value seen, and how to fix it.
"""

from __future__ import annotations

import math
from fractions import Fraction

from swiftdp.errors import InvalidArgumentError


def check_sample_rate(value: object, name: str = "sample_rate") -> float:
    """Checks that ``value`` is a probability in (0, 1] and returns it as a float.

    Args:
        value: The sampling rate q given by the user.
        name: The argument name used in the error message.

    Returns:
        ``value`` as a Python float.

    Raises:
        InvalidArgumentError: If ``value`` is not a real number in (0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise InvalidArgumentError(
            f"Expected `{name}` to be a number in (0, 1], got {name}={value!r} "
            f"(type {type(value).__name__}). Pass the probability that each example "
            "is included in a step, e.g. expected_batch_size / len(dataset)."
        )
    rate = float(value)
    if not math.isfinite(rate) or not 0.0 < rate <= 1.0:
        raise InvalidArgumentError(
            f"Expected `{name}` in (0, 1], got {name}={value!r}. Pass the probability "
            "that each example is included in a step, e.g. expected_batch_size / "
            "len(dataset); a rate of 0 would never train and a rate above 1 is not "
            "a probability."
        )
    return rate


def check_positive_int(value: object, name: str, fix: str) -> int:
    """Checks that ``value`` is an int >= 1.

    Args:
        value: The value given by the user.
        name: The argument name used in the error message.
        fix: A sentence telling the user what to pass instead.

    Returns:
        ``value`` as an int.

    Raises:
        InvalidArgumentError: If ``value`` is not an int or is < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"Expected `{name}` to be an int >= 1, got {name}={value!r}. {fix}"
        )
    return value


def exact_fraction(sample_rate: float | Fraction) -> Fraction:
    """Returns the rational number the user meant by ``sample_rate``.

    A float is read through its shortest decimal representation, so ``0.04``
    becomes exactly 1/25 and not the binary value 0.04000000000000000083...
    This is what makes step counts exact (``int(1 / 0.04)`` is 25, while the
    binary value would give 24).

    Args:
        sample_rate: A sampling rate, already checked to be in (0, 1].

    Returns:
        The exact rational value.
    """
    if isinstance(sample_rate, Fraction):
        return sample_rate
    return Fraction(repr(float(sample_rate)))
