"""What the tracer records: module calls in flight, and captured parameter uses.

A :class:`Capture` is one use of parameters whose output gradients are
awaited; its hooks hand each gradient to the capture's own step. A
:class:`Source` node lets an output require grad when no input does, so its
gradient hook can fire.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.autograd import Function

from swiftdp.clipping.contract import Build, Site

if TYPE_CHECKING:
    from swiftdp.clipping.tracer import Tracer

Builder = Build


class Source(Function):
    """Runs ``compute`` so that its output requires grad though no input does.

    Used for the first layers of a network (data inputs, detached
    parameters): the output gets a backward node whose only job is to let the
    output-gradient hook fire. Nothing flows further.
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, compute: Callable[[], Any]) -> Any:  # type: ignore[override]
        del ctx, anchor
        return compute()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        del ctx, grads
        return None, None


@dataclass
class ModuleCall:
    """A module forward in progress (kept for error messages and the generic rule)."""

    module: nn.Module
    path: str
    call_id: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    generic: dict[int, Tensor] = field(default_factory=dict)
    # The routing contexts of the calls inside it, by batched flag (see Tracer.site).
    sites: dict[bool, Site] = field(default_factory=dict, repr=False)


class Capture:
    """A use of parameters whose output gradients are awaited (by its step alone)."""

    def __init__(
        self,
        tracer: Tracer,
        n_outputs: int,
        build: Builder,
        params: Sequence[Tensor],
        call_ids: tuple[int, ...],
    ) -> None:
        step = tracer.step
        assert step is not None
        self.step = step
        self.grads: list[Tensor | None] = [None] * n_outputs
        self.build = build
        self.param_ids = {id(p) for p in params}
        self.params = list(params)
        step.captures.append(self)
        # A checkpoint's replay only refills autograd's activations: its
        # graph is never differentiated, and the original's uses were counted.
        self.inert = step.recompute == "replay"
        if step.recompute is None:
            for pid in self.param_ids:
                step.count_use(pid)
        self.call_ids = call_ids
        token = tracer.batch_token
        self.forward_index = getattr(token, "index", 0)
        self.seen = 0
        self.generation = -1

    def hook(self, index: int) -> Callable[[Tensor], None]:
        """The gradient hook of output ``index``: hands the gradient to the step."""
        step = self.step

        def fn(grad: Tensor) -> None:
            if not self.inert:
                step.receive(self, index, grad)

        return fn
