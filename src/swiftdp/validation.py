"""Checks of user input, in one place.

Every check raises a :class:`~swiftdp.errors.SwiftDPError` subclass whose
message names the argument (or module path), the value seen, and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from swiftdp.errors import InvalidArgumentError, UnsupportedModuleError

_BATCH_MIXING = (
    nn.modules.batchnorm._BatchNorm,
    nn.SyncBatchNorm,
)


def check_max_grad_norm(value: Any) -> None:
    """``max_grad_norm`` must be a finite number > 0 (or ``math.inf`` for no clipping)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isnan(value):
        raise InvalidArgumentError(
            f"Expected max_grad_norm > 0, got {value!r}. Pass the clipping threshold C, "
            "for example max_grad_norm=1.0."
        )


def check_noise_multiplier(value: Any) -> None:
    """``noise_multiplier`` must be a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise InvalidArgumentError(
            f"Expected noise_multiplier >= 0, got {value!r}. Pass a non-negative noise "
            "multiplier (0 disables noise and gives no privacy)."
        )


def check_delta(value: Any) -> None:
    """``delta`` must lie in (0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise InvalidArgumentError(
            f"Expected 0 < delta < 1, got {value!r}. Use a delta well below 1/N, for "
            "example delta=1e-5 for a dataset of 60,000 examples."
        )


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidArgumentError(
            f"Expected {name} to be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )


def check_clipping(value: Any) -> None:
    """``clipping`` must name a known clip function."""
    from swiftdp.clipping.clip_fns import CLIPPING_STYLES

    _check_choice("clipping", value, CLIPPING_STYLES)


def check_mode(value: Any, modes: Iterable[str]) -> None:
    """``mode`` must name a known clipping mode."""
    _check_choice("mode", value, modes)


def check_loss_reduction(value: Any) -> None:
    """``loss_reduction`` must be ``"mean"`` or ``"sum"``."""
    _check_choice("loss_reduction", value, ("mean", "sum"))


def check_cost_objective(value: Any) -> None:
    """``cost_objective`` must be ``"time"`` or ``"memory"``."""
    _check_choice("cost_objective", value, ("time", "memory"))


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
