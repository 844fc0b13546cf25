"""Errors raised by swiftdp.

Every error a user can trigger is a ``ValueError`` subclass whose message names
the argument or module path, the value seen, and how to fix it.
"""

from __future__ import annotations


class SwiftDPError(ValueError):
    """Base class of every user-facing swiftdp error."""


class InvalidArgumentError(SwiftDPError):
    """An argument has a value swiftdp cannot use (message says which and why)."""


class UnsupportedModuleError(SwiftDPError):
    """A module or parameter cannot be clipped exactly.

    The message names the module path (``model.encoder.layers.0.norm``) and the
    fix. swiftdp never silently skips a trainable parameter: it raises this
    error instead.
    """


class ExampleMixingError(UnsupportedModuleError):
    """The model's output for one example depends on other examples of the batch.

    Raised by the independence check (:class:`swiftdp.clipping.guard.IndependenceCheck`)
    before the first training forward of each input signature. The message
    names the module where the mixing first appears (or the buffer updated
    from the batch) and the fix.
    """


class PrivacyBudgetExceededError(SwiftDPError):
    """The next step would spend more privacy budget than the target allows.

    Raised before any parameter changes.
    """


class CheckpointError(SwiftDPError):
    """A checkpoint is corrupt, incomplete, or does not match the current run."""


class NonFiniteGradientWarning(UserWarning):
    """Examples with a NaN or infinite per-example gradient norm were dropped from a step.

    Their clip factor is 0 and their contribution is left out exactly, so the
    other examples' clipped sum is unchanged. The message gives the count.
    """


class GradientEscapeError(SwiftDPError):
    """A trainable parameter received a gradient that did not pass through clipping.

    Raised during the backward (the gradient is discarded, never applied) or
    at the optimizer step. The message names the parameter, its module and
    the fix.
    """


class StepStructureError(SwiftDPError):
    """A DP step did not see exactly one logical batch, each example once.

    Two backward passes over the same examples, a second logical batch
    before ``step()``, a logical batch left half-way, a batch that did not
    come from ``dp.data_loader``, or a step of the wrapped optimizer itself.
    """
