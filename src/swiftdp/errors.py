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


class PrivacyBudgetExceededError(SwiftDPError):
    """The next step would spend more privacy budget than the target allows.

    Raised before any parameter changes.
    """


class CheckpointError(SwiftDPError):
    """A checkpoint is corrupt, incomplete, or does not match the current run."""
