"""The compound values of ``swiftdp train``: schedules of σ and C, adaptive clipping.

Each is one string, the same on the command line and in a config file:

==========================  ==================================================
``exp:GAMMA[:MIN]``         ``initial · GAMMA ** t``, never below ``MIN``
                            (default 0): :class:`swiftdp.ExponentialSchedule`
``step:SIZE:GAMMA``         ``initial · GAMMA ** (t // SIZE)``:
                            :class:`swiftdp.StepSchedule`
``QUANTILE[:LR[:NOISE]]``   adaptive clipping, :class:`swiftdp.AdaptiveClipping`
                            (``LR`` default 0.2; ``NOISE``, the count noise,
                            default: the library's)
==========================  ==================================================

``t`` is the number of steps taken before the step (0 for the first), and
``initial`` is ``--noise-multiplier`` for ``--noise-schedule`` and
``--max-grad-norm`` for ``--clip-schedule``. The ``parse_*`` functions check
a text and return its canonical spelling (what ``config.yaml`` records); the
``build_*`` functions turn that text into the library's object.

Example:
    >>> parse_schedule("exp:0.990")
    'exp:0.99'
    >>> build_schedule("step:100:0.5", 2.0)(250)
    0.5
    >>> parse_adaptive("0.5")
    '0.5:0.2'
"""

from __future__ import annotations

import math

from swiftdp.optim.schedules import ExponentialSchedule, StepSchedule
from swiftdp.settings import AdaptiveClipping

__all__ = ["SCHEDULE_FORMS", "SpecError", "build_adaptive", "build_schedule", "parse_adaptive",
           "parse_schedule"]

SCHEDULE_FORMS = "exp:GAMMA[:MIN] or step:SIZE:GAMMA"
ADAPTIVE_FORM = "QUANTILE[:LR[:COUNT_NOISE]]"
_DEFAULT_LR = AdaptiveClipping().learning_rate


class SpecError(ValueError):
    """A text that is not a valid schedule or adaptive-clipping spec; the message says why."""


def _show(x: float) -> str:
    """The shortest text that reads back as ``x`` (``2`` for 2.0)."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _number(field: str, name: str, *, low: float, high: float = math.inf,
            closed_low: bool = False) -> float:
    try:
        value = float(field)
    except ValueError:
        raise SpecError(f"{name} must be a number, got {field!r}") from None
    ok = math.isfinite(value) and (value >= low if closed_low else value > low) and value < high
    if not ok:
        bounds = (f"in ({low:g}, {high:g})" if high < math.inf
                  else f"{'>=' if closed_low else '>'} {low:g} and finite")
        raise SpecError(f"{name} must be {bounds}, got {field!r}")
    return value


def parse_schedule(text: str) -> str:
    """Check a schedule spec and return its canonical spelling.

    Args:
        text: ``exp:GAMMA[:MIN]`` (GAMMA > 0, MIN >= 0) or ``step:SIZE:GAMMA``
            (SIZE an integer >= 1, GAMMA > 0).

    Returns:
        The same schedule, numbers written shortest (``exp:0.99``, ``step:100:0.5``).

    Raises:
        SpecError: another form, or a number out of range.
    """
    kind, *fields = text.strip().split(":")
    if kind == "exp" and len(fields) in (1, 2):
        gamma = _number(fields[0], "GAMMA", low=0.0)
        if len(fields) == 1:
            return f"exp:{_show(gamma)}"
        minimum = _number(fields[1], "MIN", low=0.0, closed_low=True)
        return f"exp:{_show(gamma)}:{_show(minimum)}"
    if kind == "step" and len(fields) == 2:
        try:
            size = int(fields[0])
        except ValueError:
            size = 0
        if size < 1:
            raise SpecError(f"SIZE must be an integer >= 1 (steps between two changes), got "
                            f"{fields[0]!r}")
        gamma = _number(fields[1], "GAMMA", low=0.0)
        return f"step:{size}:{_show(gamma)}"
    raise SpecError(f"expects {SCHEDULE_FORMS} (e.g. exp:0.99 or step:100:0.5)")


def build_schedule(text: str, initial: float) -> ExponentialSchedule | StepSchedule:
    """The library schedule of a spec (:func:`parse_schedule`'s forms) starting at ``initial``."""
    kind, *fields = parse_schedule(text).split(":")
    if kind == "exp":
        minimum = float(fields[1]) if len(fields) == 2 else 0.0
        return ExponentialSchedule(initial, float(fields[0]), minimum)
    return StepSchedule(initial, int(fields[0]), float(fields[1]))


def parse_adaptive(text: str) -> str:
    """Check an adaptive-clipping spec and return its canonical spelling.

    Args:
        text: ``QUANTILE[:LR[:COUNT_NOISE]]``: the target quantile of the
            per-example norms in (0, 1), the learning rate > 0 (default 0.2)
            and the std of the noise on the clipped count > 0 (default: the
            library's, ``max(q·N/20, σ)`` for one threshold).

    Returns:
        ``QUANTILE:LR`` or ``QUANTILE:LR:COUNT_NOISE``, numbers written shortest.

    Raises:
        SpecError: more than three fields, or a number out of range.
    """
    fields = text.strip().split(":")
    if not 1 <= len(fields) <= 3:
        raise SpecError(f"expects {ADAPTIVE_FORM} (e.g. 0.5 or 0.5:0.2)")
    quantile = _number(fields[0], "QUANTILE", low=0.0, high=1.0)
    lr = _number(fields[1], "LR", low=0.0) if len(fields) > 1 else _DEFAULT_LR
    out = f"{_show(quantile)}:{_show(lr)}"
    if len(fields) == 3:
        out += f":{_show(_number(fields[2], 'COUNT_NOISE', low=0.0))}"
    return out


def build_adaptive(text: str) -> AdaptiveClipping:
    """The :class:`swiftdp.AdaptiveClipping` of a spec (:func:`parse_adaptive`'s form)."""
    fields = [float(f) for f in parse_adaptive(text).split(":")]
    return AdaptiveClipping(target_quantile=fields[0], learning_rate=fields[1],
                            count_noise=fields[2] if len(fields) == 3 else None)
