"""Every check of user input, in one place.

Each check raises :class:`~swiftdp.errors.InvalidArgumentError` (or, for the
model checks, :class:`~swiftdp.errors.UnsupportedModuleError`), both
``ValueError`` subclasses, with a message that names the argument (or module
path), the value seen, and the fix, e.g. ``Expected noise_multiplier >= 0, got
-1.0. Pass a non-negative noise multiplier (0 disables noise).`` The numeric
checks return the checked value (as a float or int), so a caller can check and
convert in one line.

The sampling rate q has two accepted ranges; :func:`check_sample_rate` makes
each caller say which (``allow_zero=``):

* ``[0, 1]``: the accountant (:meth:`PrivacyAccountant.step`,
  :meth:`~PrivacyAccountant.epsilon_after`, :class:`AccountingSegment`). A step
  with q = 0 reads no data; it is a valid event that costs no privacy, and a
  history holding it must load again.
* ``(0, 1]``: the samplers (:class:`PoissonBatchSampler`,
  :func:`poisson_data_loader`, :func:`steps_per_epoch`) and the calibration
  (:func:`get_noise_multiplier`, :func:`steps_for_epochs`). A sampler with
  q = 0 never draws an example, an epoch is ``floor(1 / q)`` steps, and no σ
  needs calibrating for a step that reads nothing.

q = 1 (full-batch DP-SGD, no amplification by sampling) is accepted by all.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from torch import nn

from swiftdp.errors import InvalidArgumentError, UnsupportedModuleError

__all__ = [
    "check_averaging_kind",
    "check_batch_dim",
    "check_clipping",
    "check_cost_objective",
    "check_decay",
    "check_delta",
    "check_epsilon",
    "check_flag",
    "check_loss_reduction",
    "check_max_grad_norm",
    "check_mode",
    "check_module_options",
    "check_no_batch_mixing",
    "check_noise_multiplier",
    "check_positive",
    "check_positive_int",
    "check_sample_rate",
    "check_steps",
]

_SIGMA_FIX = "Pass a non-negative noise multiplier (0 disables noise)."
_RATE_FIX = (
    "Pass the probability that each example is in a step, e.g. expected_batch_size / dataset_size."
)
_DELTA_FIX = "Pass a small positive delta such as 1e-5, well below 1 / dataset_size."
_BATCH_MIXING = (
    nn.modules.batchnorm._BatchNorm,
    nn.SyncBatchNorm,
)


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


# --- privacy parameters ------------------------------------------------------


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


def check_max_grad_norm(value: Any) -> float:
    """Checks a clipping threshold C: a number > 0 (``math.inf`` for no clipping).

    Args:
        value: The ``max_grad_norm`` given by the user.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not a number > 0.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isnan(value):
        raise InvalidArgumentError(
            f"Expected max_grad_norm > 0, got {value!r}. Pass the clipping threshold C, "
            "for example max_grad_norm=1.0."
        )
    return float(value)


def check_sample_rate(value: object, *, allow_zero: bool) -> float:
    """Checks a sampling rate q: a probability in [0, 1] or in (0, 1].

    The module docstring lists which range each caller uses and why.

    Args:
        value: The sampling rate given by the user.
        allow_zero: Whether q = 0 (a step that reads no data) is accepted.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not a number in the accepted interval.
    """
    rate = _as_real(value, "sample_rate", _RATE_FIX)
    low_ok = rate >= 0 if allow_zero else rate > 0
    if not (low_ok and rate <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidArgumentError(
            f"Expected sample_rate in {interval}, got {value!r}. {_RATE_FIX}"
        )
    return rate


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


# --- counts and sizes --------------------------------------------------------


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


def check_positive_int(value: object, name: str, fix: str) -> int:
    """Checks a count or size: an int >= 1.

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


def check_batch_dim(value: object) -> int:
    """Checks a batch dimension: an int >= 0 (negative indices are refused).

    Args:
        value: The ``batch_dim`` given by the user.

    Returns:
        ``value`` as an int.

    Raises:
        InvalidArgumentError: If ``value`` is not an int >= 0.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(
            f"Expected batch_dim to be an int >= 0, got {value!r}. Pass 0 for "
            "(B, ...) inputs and 1 for (T, B, ...) inputs."
        )
    return value


def check_decay(value: object) -> float:
    """Checks the decay of an exponential moving average: a real number in [0, 1).

    Args:
        value: The ``decay`` given by the user.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: If ``value`` is not a number in [0, 1).
    """
    fix = ("Pass the weight the average keeps at each step, e.g. decay=0.999 (an average "
           "over roughly the last 1 / (1 - decay) steps).")
    decay = _as_real(value, "decay", fix)
    if not 0 <= decay < 1:
        raise InvalidArgumentError(f"Expected decay in [0, 1), got decay={value!r}. {fix}")
    return decay


def check_flag(value: object, *, name: str) -> bool:
    """Checks an on/off option: a ``bool`` (not 0, 1 or a string).

    Args:
        value: The value given by the user.
        name: The argument name used in the error message.

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: If ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise InvalidArgumentError(
            f"Expected `{name}` to be True or False, got {name}={value!r} "
            f"(type {type(value).__name__})."
        )
    return value


# --- named choices -----------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidArgumentError(
            f"Expected {name} to be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )


def check_clipping(value: Any) -> None:
    """Checks that ``clipping`` names a known clip function.

    Raises:
        InvalidArgumentError: listing the known styles.
    """
    # Imported here: swiftdp.clipping's __init__ imports the engine, which imports this module.
    from swiftdp.clipping.clip_fns import CLIPPING_STYLES

    _check_choice("clipping", value, CLIPPING_STYLES)


def check_mode(value: Any, modes: Iterable[str]) -> None:
    """Checks that ``mode`` names a known clipping mode.

    Raises:
        InvalidArgumentError: listing ``modes``.
    """
    _check_choice("mode", value, modes)


def check_loss_reduction(value: Any) -> None:
    """Checks that ``loss_reduction`` is ``"mean"`` or ``"sum"``.

    Raises:
        InvalidArgumentError: naming both.
    """
    _check_choice("loss_reduction", value, ("mean", "sum"))


def check_cost_objective(value: Any) -> None:
    """Checks that ``cost_objective`` is ``"time"``, ``"memory"``, ``"ghost"`` or ``"instantiate"``.

    ``"ghost"`` and ``"instantiate"`` force one side for every factored layer
    (for measuring each side); all four give the same clipped sum.

    Raises:
        InvalidArgumentError: naming the four.
    """
    _check_choice("cost_objective", value, ("time", "memory", "ghost", "instantiate"))


def check_averaging_kind(value: Any) -> None:
    """Checks that ``kind`` names a parameter average: ``"ema"`` or ``"polyak"``.

    Raises:
        InvalidArgumentError: naming both.
    """
    _check_choice("kind", value, ("ema", "polyak"))


# --- the model ---------------------------------------------------------------


def check_no_batch_mixing(model: nn.Module) -> None:
    """Refuse layers that mix the examples of a batch (BatchNorm).

    Raises:
        UnsupportedModuleError: naming the first such module's path.
    """
    for path, m in model.named_modules():
        if isinstance(m, _BATCH_MIXING):
            raise UnsupportedModuleError(
                f"Module `{path or '<model>'}` ({type(m).__name__}) mixes the examples of a "
                "batch, so per-example gradients (and differential privacy) are undefined. "
                "Replace it with GroupNorm: `model = swiftdp.fix(model)`."
            )


def check_module_options(model: nn.Module) -> None:
    """Refuse module options that mix examples or leak the batch outside the noisy gradient.

    The layer rules refuse these at the op level; this module-level check
    covers the nanobatch mode, which runs without the tracer:
    ``nn.Embedding`` with ``scale_grad_by_freq``
    (frequencies over the batch), ``max_norm`` (in-place, data-dependent
    renormalisation of the looked-up rows) or ``sparse``, and instance norms
    that update running statistics from the private batch.

    Raises:
        UnsupportedModuleError: naming the first such module's path and the fix.
    """
    for path, m in model.named_modules():
        where = f"Module `{path or '<model>'}` ({type(m).__name__})"
        if isinstance(m, nn.Embedding):
            if m.scale_grad_by_freq:
                raise UnsupportedModuleError(
                    f"{where} has scale_grad_by_freq=True, which scales gradients by token "
                    "counts over the whole batch and so mixes the examples. Use "
                    "scale_grad_by_freq=False."
                )
            if m.max_norm is not None:
                raise UnsupportedModuleError(
                    f"{where} has max_norm={m.max_norm}: the forward renormalises, in place "
                    "and data-dependent, the rows the private batch looks up, revealing it without "
                    "noise. Use max_norm=None (renormalise all rows after each step if needed)."
                )
            if m.sparse:
                raise UnsupportedModuleError(
                    f"{where} has sparse=True; DP noise makes every gradient dense. Use "
                    "sparse=False with a dense optimizer."
                )
        if (
            isinstance(m, nn.modules.instancenorm._InstanceNorm)
            and m.track_running_stats
            and m.training
        ):
            raise UnsupportedModuleError(
                f"{where} has track_running_stats=True: its running statistics are "
                "computed from the private batch and released without noise. Use "
                "track_running_stats=False."
            )
        if isinstance(m, _BATCH_MIXING):
            raise UnsupportedModuleError(
                f"Module `{path or '<model>'}` ({type(m).__name__}) mixes the examples of a "
                "batch, so per-example gradients (and differential privacy) are undefined. "
                "Replace it with GroupNorm: `model = swiftdp.fix(model)`."
            )
