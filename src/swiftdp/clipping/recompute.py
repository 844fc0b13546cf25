"""Activation checkpointing: the forward that ``torch.utils.checkpoint`` reruns in the backward.

Both of torch's implementations rerun part of the forward inside the
backward pass, and the engine handles each exactly:

* **non-reentrant** (``use_reentrant=False``, Hugging Face's default): the
  original forward ran under the engine as usual, and its captures receive
  the output gradients; the rerun only refills the activations autograd
  dropped. The engine wraps the rerun during the first run and *replays*
  it — the same routing from the same module stack, so autograd sees the
  same saved tensors — with every capture inert.
* **reentrant** (``use_reentrant=True``): the original forward ran under
  ``no_grad`` and captured nothing; the rerun is differentiated by a nested
  backward. During the first run the engine wraps the checkpoint's function
  (found on the call stack), so the rerun is *joined* to the step of the
  original forward: its captures are that step's, clipped with the rest at
  the end of the outer backward. The rerun's inputs are detached copies; they
  get the batch marks of the first run's inputs position by position, never
  by size.

Anything else that runs the model inside a backward pass is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.utils.checkpoint as _ckpt
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from swiftdp.clipping import batchdim
from swiftdp.errors import UnsupportedModuleError

if TYPE_CHECKING:
    from swiftdp.clipping.step import ForwardToken, Step
    from swiftdp.clipping.tracer import ModuleCall, Tracer

Kind = Literal["replay", "join"]

# States of a module call in flight (the engine's stack of them).
OFF, FORWARD, JOIN, REPLAY = 0, 1, 2, 3

_CHECKPOINT_FILE = _ckpt.__file__


def kind() -> Kind | None:
    """Which checkpoint rerun the current code runs in, or ``None`` for neither.

    Looks up the call stack for the innermost frame of ``torch.utils.checkpoint``
    that reruns a forward: ``recompute_fn`` (non-reentrant) or
    ``CheckpointFunction.backward`` (reentrant).
    """
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_filename == _CHECKPOINT_FILE:
            if code.co_name == "recompute_fn":
                return "replay"
            if code.co_name == "backward":
                return "join"
        f = f.f_back
    return None


def reentrant_contexts() -> list[tuple[Any, tuple[Any, ...]]]:
    """The reentrant checkpoints whose first run is in progress, innermost first.

    Read from the frames of ``CheckpointFunction.forward`` on the call stack:
    ``(ctx, args)``, where ``ctx.run_function`` is what the backward reruns on
    detached copies of ``args``.
    """
    out = []
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_filename == _CHECKPOINT_FILE and code.co_name == "forward":
            loc = f.f_locals
            ctx, args = loc.get("ctx"), loc.get("args")
            if ctx is not None and hasattr(ctx, "run_function") and isinstance(args, tuple):
                out.append((ctx, args))
        f = f.f_back
    return out


def checkpoint_frame() -> Any | None:
    """The frame of the non-reentrant checkpoint whose first run is in progress, if any.

    Its ``recompute_fn`` is what the backward reruns. Found through the
    saved-tensor hooks the checkpoint installs for its region (the innermost
    pair), so the check costs one lookup per module call.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    pack = hooks[0]
    code = getattr(pack, "__code__", None)
    if code is None or code.co_filename != _CHECKPOINT_FILE or "frame" not in code.co_freevars:
        return None
    closure = pack.__closure__
    if closure is None:
        return None
    cell = closure[code.co_freevars.index("frame")]
    frame = cell.cell_contents
    return frame if hasattr(frame, "recompute_fn") else None


def marks_of(args: tuple[Any, ...]) -> list[tuple[object, int | None, bool] | None]:
    """The batch mark of each positional argument (``None`` for a non-tensor or unmarked one)."""
    return [getattr(t, batchdim.ATTR, None) if isinstance(t, Tensor) else None for t in args]


def restore_marks(args: tuple[Any, ...], marks: list[tuple[object, int | None, bool] | None]
                  ) -> None:
    """Give the rerun's detached inputs the marks of the first run's inputs, position by position."""
    for t, m in zip(args, marks, strict=False):
        if m is not None and isinstance(t, Tensor) and getattr(t, batchdim.ATTR, None) is None:
            batchdim.mark(t, *m[:4])


def token_of(args: Any, accept: Callable[[object], bool]) -> object | None:
    """The first batch token carried by a tensor of ``args`` that ``accept`` takes."""
    for t in pytree.tree_leaves(args):
        if isinstance(t, Tensor):
            m = getattr(t, batchdim.ATTR, None)
            if m is not None and accept(m[0]):
                return m[0]
    return None


class Sessions:
    """What a rerun needs of the engine: its tracer, its stack of call states, its suspension.

    Args:
        tracer: the engine's tracer.
        states: the engine's stack of module-call states (``OFF``, ``FORWARD``,
            ``JOIN``, ``REPLAY``), shared and changed in place.
        suspended: whether the engine is suspended.
    """

    def __init__(self, tracer: Tracer, states: list[int], suspended: Callable[[], bool]) -> None:
        self.tracer = tracer
        self.states = states
        self.suspended = suspended

    def run(self, state: int, step: Step, token: ForwardToken, kind: Kind,
            stack: list[ModuleCall] | None, fn: Callable[..., Any], *inputs: Any) -> Any:
        """Run ``fn`` as a rerun of ``kind`` for ``step``, traced."""
        tr = self.tracer
        self.states.append(state)
        tr.begin_recompute(step, token, kind, stack)
        if kind == "join":
            step.ensure_finalize()  # on the outer backward, not the checkpoint's nested one
        tr.__enter__()
        try:
            return fn(*inputs)
        finally:
            tr.__exit__(None, None, None)
            tr.end_recompute()
            self.states.pop()

    def current(self) -> tuple[Step, ForwardToken] | None:
        """The step and token of the forward being traced, if any."""
        from swiftdp.clipping.step import ForwardToken

        tr = self.tracer
        step, token = tr.step, tr.batch_token
        if step is None or not isinstance(token, ForwardToken):
            return None
        return step, token


def wrap_replay(sessions: Sessions, frame: Any) -> None:
    """Make a non-reentrant checkpoint's rerun a replay of its first run (once per frame).

    The rerun is traced from the module stack the first run began in, so it
    routes every call as the first run did and autograd gets back the same
    saved tensors; its captures are inert.
    """
    if getattr(frame, "_swiftdp_replay", False):
        return
    cur = sessions.current()
    if cur is None:
        return
    step, token = cur
    fn = frame.recompute_fn
    _require_rng_preserved(fn, "preserve_rng_state")
    frame._swiftdp_replay = True
    stack = sessions.tracer.snapshot_stack()

    def run(*inputs: Any) -> Any:
        if sessions.suspended():
            return fn(*inputs)
        return sessions.run(REPLAY, step, token, "replay", stack, fn, *inputs)

    frame.recompute_fn = run


def wrap_reentrant(sessions: Sessions, module: nn.Module, path: str) -> None:
    """Join the reruns of the reentrant checkpoints in progress to the step being traced.

    Called at a module call without gradients inside a traced forward: each
    enclosing ``CheckpointFunction`` not wrapped yet gets its function
    wrapped, so that its rerun in the backward is traced as part of this
    step, with its inputs marked as the first run's were and the trainable
    parameters passed to it used as themselves (routed and clipped; the
    checkpoint then returns no gradient for them).

    Raises:
        UnsupportedModuleError: no input of the checkpoint requires grad, so
            torch would never rerun it and ``module``'s trainable parameters
            would get no gradient.
    """
    cur = sessions.current()
    if cur is None:
        return
    step, token = cur
    for ctx, args in reentrant_contexts():
        if getattr(ctx, "_swiftdp_joined", False):
            continue
        if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if any(id(p) in step.trainable for p in module.parameters(recurse=False)):
                raise UnsupportedModuleError(
                    f"Module `{path}` runs inside torch.utils.checkpoint(use_reentrant=True) "
                    "and none of the checkpoint's inputs requires grad, so torch never "
                    "recomputes it and its trainable parameters would get no gradient "
                    "(torch warns the same). Use use_reentrant=False, or make the input "
                    "require grad (Hugging Face: model.enable_input_require_grads())."
                )
            continue
        if not getattr(ctx, "preserve_rng_state", True):
            _refuse_rng(path)
        ctx._swiftdp_joined = True
        params = {i: a for i, a in enumerate(args)
                  if isinstance(a, Tensor) and step.trainable.get(id(a)) is a}
        ctx.run_function = _joined(sessions, ctx.run_function, step, token, marks_of(args),
                                   params)


def _require_rng_preserved(fn: Any, name: str) -> None:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None or name not in code.co_freevars:
        return
    if not cells[code.co_freevars.index(name)].cell_contents:
        _refuse_rng("<checkpointed region>")


def _refuse_rng(path: str) -> None:
    raise UnsupportedModuleError(
        f"Module `{path}` runs inside torch.utils.checkpoint(preserve_rng_state=False): "
        "its rerun in the backward draws other random numbers (dropout masks) than the "
        "first run, so one example's clipped gradient would mix two different forwards. "
        "Use preserve_rng_state=True (the default)."
    )


def _joined(sessions: Sessions, fn: Callable[..., Any], step: Step, token: ForwardToken,
            marks: list[Any], params: dict[int, Tensor]) -> Callable[..., Any]:
    def run(*inputs: Any) -> Any:
        if sessions.suspended() or not torch.is_grad_enabled() or \
                torch._C._current_graph_task_id() == -1:
            return fn(*inputs)
        restore_marks(inputs, marks)
        if params:  # the parameter itself, routed and clipped, not a detached copy
            inputs = tuple(params.get(i, x) for i, x in enumerate(inputs))
        return sessions.run(JOIN, step, token, "join", None, fn, *inputs)

    return run
