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

from torch import nn
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
