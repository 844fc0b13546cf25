"""The escape guard: no gradient but the engine's reaches a trainable parameter.

The engine uses every trainable parameter detached, so autograd never
delivers a gradient to one. Each trainable parameter therefore carries a
gradient hook: if autograd ever hands it a gradient (to accumulate into
``.grad``, or to return from ``torch.autograd.grad``), that gradient bypassed
clipping (the parameter was used outside the engine's view). The hook raises
:class:`~swiftdp.errors.GradientEscapeError` before anything is accumulated.
An undefined gradient (an ``autograd.Function`` that returns ``None`` for the
parameter, as reentrant checkpointing does for the parameters it was handed)
carries nothing and passes. Parameters are enumerated again at every
forward, so parameters added or unfrozen later are guarded too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from swiftdp.errors import GradientEscapeError


class ParameterGuard:
    """The trainable parameters of a model, each guarded against escaped gradients.

    Args:
        model: the model.
        name_of: the qualified name of a parameter (for the error message).
        suspended: whether the engine is suspended (its own per-example passes
            in nanobatch mode differentiate the parameters themselves).
    """

    def __init__(self, model: nn.Module, name_of: Callable[[Tensor], str],
                 suspended: Callable[[], bool]) -> None:
        self.model = model
        self.name_of = name_of
        self.suspended = suspended
        self._guards: dict[int, tuple[Tensor, Any]] = {}

    def refresh(self) -> tuple[dict[int, Tensor], bool]:
        """Enumerate the trainable parameters now; guard any new one.

        Returns:
            ``(trainable, added)``: the parameters by id, and whether any was
            guarded for the first time (new modules may need hooks).
        """
        trainable: dict[int, Tensor] = {
            id(p): p for p in self.model.parameters() if p.requires_grad}
        guards, added = self._guards, False
        for pid, p in trainable.items():
            g = guards.get(pid)
            if g is None or g[0] is not p:
                guards[pid] = (p, p.register_hook(self._make_check(p)))
                added = True
        if len(guards) > len(trainable):
            for pid in [k for k in guards if k not in trainable]:
                if not guards[pid][0].requires_grad:  # frozen: nothing can accumulate
                    guards.pop(pid)[1].remove()
        return trainable, added

    def remove(self) -> None:
        """Remove every hook."""
        for _, h in self._guards.values():
            h.remove()
        self._guards.clear()

    def _make_check(self, p: Tensor) -> Callable[[Tensor | None], None]:
        ref = weakref.ref(p)

        def check(grad: Tensor | None) -> None:
            if grad is None or self.suspended():
                return
            q = ref()
            if q is not None:
                self._escaped(q)

        return check

    def _escaped(self, p: Tensor) -> None:
        name = self.name_of(p)
        module = name.rpartition(".")[0] or "<model>"
        raise GradientEscapeError(
            f"Parameter `{name}` (module `{module}`) received a gradient from autograd that "
            "did not pass through swiftdp's per-example clipping; it was refused before "
            "reaching `.grad`, nothing was applied. Every use of a trainable parameter must happen inside a call of "
            "the model itself, `model(x)`. Common causes: calling `model.forward(x)` or a "
            "submodule's forward from outside the model, using the parameter in the loss, a "
            "hook added after the engine, a custom autograd.Function, or a tensor the "
            "parameter was passed to that is differentiated outside the model. Call `model(x)`, move "
            "the computation into the model's forward, or freeze the parameter with "
            "`requires_grad_(False)`."
        )
