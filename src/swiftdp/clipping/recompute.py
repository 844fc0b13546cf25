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
from typing import Any, Literal

import torch
import torch.utils.checkpoint as _ckpt
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.clipping import batchdim

Kind = Literal["replay", "join"]

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
            batchdim.mark(t, m[0], m[1], m[2])


def token_of(args: Any, accept: Callable[[object], bool]) -> object | None:
    """The first batch token carried by a tensor of ``args`` that ``accept`` takes."""
    for t in pytree.tree_leaves(args):
        if isinstance(t, Tensor):
            m = getattr(t, batchdim.ATTR, None)
            if m is not None and accept(m[0]):
                return m[0]
    return None
