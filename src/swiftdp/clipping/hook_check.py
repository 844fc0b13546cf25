"""Refuse module backward hooks: they rewrite gradients after the engine reads them.

A ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` (on a
module, or globally) may return a new gradient for a module's inputs or
outputs. The engine captures each layer's output gradient per example; a hook
that, say, adds the batch mean of the gradient on its way down hands every
lower layer gradients that mix the examples, and each example's clipped
gradient then depends on the others (measured: sensitivity 1.1·C). Such hooks
are refused at every forward with gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from swiftdp.errors import UnsupportedModuleError

__all__ = ["check_no_backward_hooks"]


def check_no_backward_hooks(model: nn.Module) -> None:
    """Raise if ``model`` or any submodule (or the global registry) has a backward hook.

    Raises:
        UnsupportedModuleError: naming the module and the fix.
    """
    if module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks:
        raise UnsupportedModuleError(
            "A global module backward hook is registered (torch.nn.modules.module."
            "register_module_full_backward_hook or ..._pre_hook): it can rewrite gradients "
            "between layers after swiftdp captured them, mixing the examples' gradients "
            "unclipped. Remove it while training privately.")
    for name, m in model.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            raise UnsupportedModuleError(
                f"Module `{name or '<model>'}` ({type(m).__name__}) has a backward hook "
                "(register_full_backward_hook / register_full_backward_pre_hook): it can "
                "rewrite the gradient flowing to the layers below after swiftdp captured it, "
                "so each example's clipped gradient could depend on the others. Remove the "
                "hook (handle.remove()) while training privately; to read gradients, use "
                "dp.clipper.last_norms or the optimizer's noised p.grad after the step.")


def read_only_hook(hook: Callable[[Tensor], Any], path: str,
                   where: str | None = None) -> Callable[[Tensor], None]:
    """``hook`` as registered on an activation during a traced forward: it may only read.

    A tensor hook on an activation that carries the batch (registered in a
    module's forward or by a forward hook, at any step) can rewrite the
    gradient flowing to the layers below after the engine captured it,
    moving one example's loss into another's gradient. The engine registers
    such hooks wrapped: one that returns a replacement gradient or modifies
    it in place is refused at the backward, before any clipped sum exists.
    ``where`` says where it was registered (default: during the forward of
    module ``path``).

    Raises:
        UnsupportedModuleError: (at the backward) the hook changed the gradient.
    """
    place = where or f"during the forward of module `{path}`"

    def guarded(grad: Tensor) -> None:
        version = grad._version
        out = hook(grad)
        if (out is not None and out is not grad) or grad._version != version:
            raise UnsupportedModuleError(
                f"A tensor hook registered {place} changed the "
                "gradient of an activation (it returned a new gradient or modified it in "
                "place). It would reach the layers below after per-example clipping read "
                "them, and can move one example's loss into another's gradient. Under DP, "
                "hooks on activations may read gradients (return None) only.")
        return None

    return guarded
