"""Everything a layer rule may know of the engine: the contract of ``swiftdp.layers``.

A rule is a leaf. It is called instead of a torch function whose arguments
hold a trainable parameter, with a :class:`Recorder` for this call; it
computes the function's output with the parameters detached and hands the
recorder a :class:`Build` that turns the output gradients into
:class:`~swiftdp.clipping.contributions.Contribution` objects. It reads the
call's context from :attr:`Recorder.site` and the mode's choices from the
:class:`Policy` given to ``build`` — never the engine itself — so a rule can
be tested with a fake recorder. A rule that does not handle a call raises
:class:`Decline` and the dispatcher falls back (expand rule, then the
generic per-example recomputation).

Example:
    >>> def scale_rule(rec, func, args, kwargs):          # doctest: +SKIP
    ...     x, w = args
    ...     def build(grads, policy):
    ...         return [PerSampleGrads(w, (grads[0] * x).sum(1))]
    ...     return rec.track(lambda: func(x, w.detach()), [x], [w], build)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from swiftdp.clipping import batchdim
from swiftdp.clipping.contributions import Contribution
from swiftdp.errors import UnsupportedModuleError


class Decline(Exception):
    """Raised by a rule for a call it does not handle: the dispatcher falls back."""


class Unbatched(UnsupportedModuleError):
    """Raised by a rule whose input does not carry the batch.

    When no operand of the call carries it (a relative position table looked
    up with ``(T, T)`` indices), the dispatcher runs the call without the
    batch and credits its gradient where the result meets the batch
    (:mod:`swiftdp.clipping.shared`); otherwise the error stands.
    """


@dataclass(frozen=True)
class Site:
    """Where a parameter use happens.

    Attributes:
        batch_size: examples in the forward in progress.
        batch_dim: the batch dimension of sequence-shaped activations (0 or 1).
        batch_first: whether sequence activations are ``(B, T, ...)``.
        module_path: path of the innermost running module (for messages).
        module: that module (``None`` at the top level).
        module_args: its positional arguments (a recurrent rule reads the
            packed input there).
        module_kwargs: its keyword arguments.
        trainable: the trainable parameters by id (see :meth:`is_trainable`).
        batch_token: the mark of tensors derived from this forward's batch.
        call_batched: whether the call being routed has an input that
            carries the batch (tensors a composite rule derives from it are
            not marked, so they count as batched through this).
    """

    batch_size: int
    batch_dim: int
    batch_first: bool
    module_path: str
    module: nn.Module | None
    module_args: tuple[Any, ...]
    module_kwargs: dict[str, Any]
    trainable: Any
    batch_token: object
    call_batched: bool

    def is_trainable(self, t: Any) -> bool:
        """Whether ``t`` is a trainable parameter tracked by the engine."""
        return isinstance(t, Tensor) and self.trainable.get(id(t)) is t

    def carries_batch(self, t: Any) -> bool:
        """Whether ``t`` derives from the model's batched inputs (tracked, not guessed)."""
        return self.call_batched or self.batch_dim_of(t) is not False

    def batch_dim_of(self, t: Any) -> int | bool | None:
        """The tracked batch dimension of ``t``: an int, ``None`` (unknown) or ``False``
        (``t`` does not derive from the batch)."""
        carries, dim = batchdim.read(t, self.batch_token)
        return dim if carries else False


class Policy(Protocol):
    """The mode's choices, handed to every :data:`Build` at backward time."""

    @property
    def cost_objective(self) -> str:
        """``"time"`` or ``"memory"`` (what the cost models minimise), or ``"ghost"``/``"instantiate"`` (forced)."""
        ...

    @property
    def allow_pairs(self) -> bool:
        """Whether an embedding may use the token-pair ghost method."""
        ...

    def factored(self, seq_len: int, d_in: int, d_out: int) -> bool:
        """Ghost norm (``True``) or instantiation for a factored layer of these shapes."""
        ...

    def factored_conv(self, positions: int, d_in: int, d_out: int) -> bool:
        """The same choice for a convolution (instantiation there costs more)."""
        ...

    def conv_sum_from_factors(self, factor_elems: int, grad_elems: int) -> bool:
        """For an instantiating convolution: gradients for the norms only, the sum from factors."""
        ...


Build = Callable[[Sequence[Tensor | None], Policy], list[Contribution]]
"""Turns a use's output gradients (``None`` where none arrived) into contributions."""


class Recorder(Protocol):
    """What a rule receives: the call's context and a way to capture its output gradients."""

    @property
    def site(self) -> Site:
        """The context of this call."""
        ...

    def track(
        self,
        compute: Callable[[], Any],
        inputs: Sequence[Any],
        params: Sequence[Tensor | None],
        build: Build,
    ) -> Any:
        """Run ``compute`` (parameters detached) and capture its output gradients for ``build``.

        Args:
            compute: computes the output (a tensor or a tuple of tensors).
            inputs: the op's non-parameter tensor inputs.
            params: the trainable parameters this use contributes to.
            build: called once the output gradients are known.

        Returns:
            What ``compute`` returned.
        """
        ...

    def broadcast_batch(self, t: Tensor, dim: int) -> None:
        """Mark ``t``'s dimension ``dim`` as a batch made by broadcasting (rows alike).

        For an output computed from inputs shared by the whole batch and
        expanded to it: every later op must keep its rows aligned with the
        examples (otherwise the op is refused), so row ``i``'s gradient is
        example ``i``'s.
        """
        ...


Rule = Callable[[Recorder, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""``rule(recorder, func, args, kwargs) -> output``."""

__all__ = ["Build", "Decline", "Policy", "Recorder", "Rule", "Site"]
