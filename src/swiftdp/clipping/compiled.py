"""``torch.compile`` and the clipping engine: compiled code runs exactly, or is refused.

swiftdp's hooks are Python with state: the engine's module, tensor and
torch-function hooks (:mod:`.engine`), the loss check, the independence
probe. Dynamo cannot be trusted with them — torch 2.13 stops inside the
tracer with an internal ``AssertionError``, and the independence probe,
traced, reports mixing that is not there — so the one rule here is: **no
swiftdp hook runs inside a compiled graph.** What may be compiled follows
from the mode:

* ``"bk"``, ``"ghost"``, ``"per_sample"`` clip exactly because the tracer
  sees every use of every trainable parameter in eager Python during the
  forward, which a compiled graph hides. Every compiled part of the model
  (the ``torch.compile`` wrapper, compiled submodules, compiled functions
  called in ``forward``) runs eagerly there: the outermost call enters
  ``torch.compiler.set_stance("force_eager")`` and leaves it when it
  returns. The clipped update is the eager one, bit for bit; compile gains
  nothing in these modes, and a warning says so.
* ``"nanobatch"`` keeps no tracer: the batched forward only produces the
  outputs, and each example's gradient comes from its own forward and
  backward (:mod:`.nanobatch`). Compiled submodules (``torch.compile(block)``
  or ``block.compile()``) run compiled in both; the model's own top-level
  call stays eager, since the engine's root hooks run there.

Either way a ``torch.compile(model)`` wrapper is unwrapped (the engine hooks
``model._orig_mod``, parameter names carry no ``_orig_mod.`` prefix) and runs
eagerly at its top level. A swiftdp hook that dynamo traces anyway —
``model.compile()`` on the model itself, ``torch.compile`` applied after
swiftdp was attached, a compiled function that calls the model, a submodule
compiled in place that the bk modes recompute in the backward — raises
:class:`~swiftdp.errors.UnsupportedModuleError`, naming what works.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from swiftdp.clipping.module_hooks import DroppedOnCopy
from swiftdp.errors import UnsupportedModuleError

__all__ = ["CompiledHooks", "compiled_parts", "prepare_compiled"]

_TRACED_MODES = ("bk", "ghost", "per_sample")  # the modes whose tracer must see every op


def prepare_compiled(model: nn.Module, mode: str) -> tuple[nn.Module, CompiledHooks]:
    """Unwrap a compiled model for the engine; refuse what cannot run exactly.

    Args:
        model: the model given to :class:`~swiftdp.clipping.engine.GradClipper`:
            plain, ``torch.compile(model)``, compiled in place
            (``model.compile()``), or with compiled submodules.
        mode: the engine mode (already checked).

    Returns:
        ``(module, hooks)``: the module the engine must hook (``model._orig_mod``
        for a ``torch.compile`` wrapper, else ``model``), and the hooks that keep
        swiftdp's hooks out of compiled graphs; the engine calls
        :meth:`CompiledHooks.attach` after attaching its own, and removes them
        with its own.

    Raises:
        UnsupportedModuleError: the model itself was compiled in place
            (``model.compile()``): its call runs inside a compiled graph, with
            swiftdp's hooks in it. The message gives what works.

    Privacy: a forward whose swiftdp hooks would run inside a compiled graph
    is refused at its first call, before any gradient exists; in the bk modes
    no compiled graph runs in a clipped forward at all, so every parameter
    use is clipped as in eager mode.
    """
    wrapper: nn.Module | None = None
    inner = model
    while _is_optimized_module(inner):
        wrapper = wrapper or inner
        inner = inner._orig_mod  # type: ignore[assignment]
    if _compiled_in_place(inner):
        raise UnsupportedModuleError(_refusal("<model>", mode, "model.compile() was called on it"))
    parts = compiled_parts(inner)
    if wrapper is not None:
        parts.insert(0, "<model> (torch.compile(model))")
    if parts and mode in _TRACED_MODES:
        warnings.warn(
            f"mode={mode!r} runs the compiled parts of this model eagerly ({_listing(parts)}): "
            "it clips by reading every parameter use in eager Python, which a compiled graph "
            "hides. The clipped update is exact; compile gains nothing in this mode. "
            "mode='nanobatch' runs compiled submodules compiled (one forward and backward "
            "per example).",
            UserWarning, stacklevel=3,
        )
    elif wrapper is not None:
        warnings.warn(
            "mode='nanobatch' runs the top level of torch.compile(model) eagerly (swiftdp's "
            "hooks on the model must not run inside a compiled graph): the wrapper gains "
            "nothing. Compile the model's submodules instead (torch.compile(block) or "
            "block.compile()): they run compiled, in the per-example passes too.",
            UserWarning, stacklevel=3,
        )
    return inner, CompiledHooks(inner, wrapper, mode)


def compiled_parts(model: nn.Module) -> list[str]:
    """The paths of the compiled submodules of ``model`` (``torch.compile`` or ``.compile()``).

    Args:
        model: the model.

    Returns:
        Each compiled submodule's path (``"<model>"`` for the model compiled
        in place), outermost first; modules inside a compiled one are not listed.
    """
    out: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in out):
            continue
        if _is_optimized_module(m) or _compiled_in_place(m):
            out.append(path or "<model>")
    return out


class CompiledHooks:
    """The forward hooks that keep swiftdp's hooks out of compiled graphs.

    * On the ``torch.compile`` wrapper (if any), the model, and in the bk
      modes every compiled submodule wrapper: a pre-hook, run first, that
      enters ``set_stance("force_eager")`` (in ``"nanobatch"``, the model's
      own call only counts its depth), and a forward hook (``always_call``,
      after the engine's) that leaves it. Everything compiled under such a
      call runs eagerly — in the bk modes, a compiled submodule wrapper that
      activation checkpointing recomputes in the backward too.
    * On every module with parameters: a pre-hook, run first, that refuses
      the call when dynamo traces it — in the bk modes always, in
      ``"nanobatch"`` outside a call of the model and outside the engine's
      per-example passes (where the engine's hooks do nothing).

    Args:
        model: the unwrapped model.
        wrapper: the ``torch.compile`` wrapper of ``model``, if any.
        mode: the engine mode.
    """

    def __init__(self, model: nn.Module, wrapper: nn.Module | None, mode: str) -> None:
        self.model = model
        self.wrapper = wrapper
        self.mode = mode
        self._handles: list[Any] = []
        self._stances: list[Any] = []  # the stances entered, innermost last
        self._depth = 0  # calls of the model in progress
        self._suspended: Callable[[], bool] = lambda: False

    def attach(self, suspended: Callable[[], bool] = lambda: False) -> CompiledHooks:
        """Attach the hooks (once); returns ``self``, whose :meth:`remove` detaches them.

        Args:
            suspended: whether the engine is suspended (its own per-example
                passes in ``"nanobatch"``, whose backward may recompute a
                checkpointed compiled submodule after the model's call returned).
        """
        if self._handles:
            return self
        self._suspended = suspended
        model, eager_all = self.model, self.mode in _TRACED_MODES
        calls: list[tuple[str, nn.Module, bool]] = [("<model>", model, eager_all)]
        if self.wrapper is not None:
            calls.insert(0, ("<model> (its torch.compile wrapper)", self.wrapper, True))
        if eager_all:
            calls += [(p, m, True) for p, m in model.named_modules()
                      if m is not model and _is_optimized_module(m)]
        for path, m, eager in calls:
            root = m is model
            self._handles.append(
                m.register_forward_pre_hook(DroppedOnCopy(self._enter(path, eager, root)),
                                         prepend=True))
            self._handles.append(m.register_forward_hook(DroppedOnCopy(self._leave(root)), always_call=True))
        for path, m in model.named_modules():
            if m is not model and any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_pre_hook(
                    DroppedOnCopy(self._sentinel(path)), prepend=True))
        return self

    def remove(self) -> None:
        """Remove the hooks (the engine calls it from its ``remove()``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._stances:
            self._stances.pop().__exit__(None, None, None)
        self._depth = 0

    def _enter(self, path: str, eager: bool, root: bool) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._stances.append(_NO_STANCE)  # popped by the forward hook, even if this raises
            self._depth += root
            if torch.compiler.is_compiling():
                _refuse(path, self.mode)
            if not eager or "torch._dynamo" not in sys.modules:  # nothing was ever compiled
                return
            try:
                self._stances[-1] = torch.compiler.set_stance("force_eager")
            except RuntimeError as e:  # dynamo refuses a stance change inside compiled code
                raise UnsupportedModuleError(_refusal(path, self.mode, _TRACED)) from e

        return hook

    def _leave(self, root: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._depth -= root
            if self._stances:
                self._stances.pop().__exit__(None, None, None)

        return hook

    def _sentinel(self, path: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling() and (
                    self.mode in _TRACED_MODES or not (self._depth or self._suspended())):
                _refuse(path, self.mode)

        return hook


class _NoStance:
    def __exit__(self, *exc: object) -> None:
        return None


_NO_STANCE = _NoStance()
_TRACED = ("torch.compile is tracing it (model.compile(), torch.compile applied after swiftdp "
           "was attached, a compiled function that calls the model, or a submodule compiled in "
           "place that activation checkpointing recomputes)")
_disabled: list[Any] = []  # torch.compiler.disable(_raise_refusal), made when first needed


def _refuse(path: str, mode: str) -> None:
    """Raise the refusal when the compiled code runs: dynamo graph-breaks here, never traces it.

    Only called while dynamo traces, so ``torch._dynamo`` is loaded already
    (swiftdp never imports it). Under ``fullgraph=True`` dynamo raises its
    own error at the graph break, with the reason below.
    """
    if not _disabled:
        _disabled.append(torch.compiler.disable(
            _raise_refusal, reason="swiftdp's hooks never run inside a compiled graph: call the "
            "model outside compiled code, compile its submodules, or pass torch.compile(model) "
            "to swiftdp before any other compile"))
    _disabled[0](path, mode)


def _raise_refusal(path: str, mode: str) -> None:
    raise UnsupportedModuleError(_refusal(path, mode, _TRACED))


def _refusal(path: str, mode: str, why: str) -> str:
    if mode in _TRACED_MODES:
        works = (
            f"mode={mode!r} clips exactly by reading every parameter use in eager Python during "
            "the forward (module, tensor and torch-function hooks), which a compiled graph "
            "hides. Give swiftdp the model uncompiled, or compiled as torch.compile(model) or "
            "with compiled submodules (swiftdp runs those eagerly in this mode), and call it "
            "outside compiled code; or use mode='nanobatch', which runs compiled submodules "
            "compiled."
        )
    else:
        works = (
            "swiftdp's hooks on the model (the per-example passes, the loss and independence "
            "checks) must run eagerly. Compile the model's submodules instead "
            "(torch.compile(block) or block.compile()): mode='nanobatch' runs them compiled; "
            "and call the model outside compiled code."
        )
    return f"Module `{path}` cannot run compiled under mode={mode!r}: {why}. {works}"


def _listing(parts: list[str]) -> str:
    return ", ".join(f"`{p}`" for p in parts[:4]) + (", ..." if len(parts) > 4 else "")


def _is_optimized_module(m: nn.Module) -> bool:
    ef = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing was ever compiled
    return ef is not None and isinstance(m, ef.OptimizedModule)


def _compiled_in_place(m: nn.Module) -> bool:
    return getattr(m, "_compiled_call_impl", None) is not None
