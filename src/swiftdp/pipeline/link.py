"""The exchange between neighbouring pipeline stages, owned by the library.

A stage's activations go forward and their gradient comes back through
:class:`StageLink` only (``torch.distributed`` point-to-point, one stage per
rank), never through the user's loop, so the gradient a stage backpropagates
is exactly the next stage's ``∂L/∂h`` of its checked loss:

* ``dp.receive_activations()`` (every stage after the first) returns the
  previous stage's activations, detached. When the stage's model is called on
  them, a forward pre-hook hands the model a fresh leaf in their place. The
  gradient sent back is not that leaf's ``.grad`` (code that kept a handle on
  the leaf, a hook or a model caching its input, could add any term to it)
  but the vector-Jacobian product of the model's own graph: when the
  backward reaches the model's outputs, ``torch.autograd.grad(outputs, leaf,
  their gradients)``, a second pass through this stage's model for the input
  only. It is sent once this stage's backward has been accepted by the
  engine (one backward, one forward, the current batch).
* ``dp.send_activations(h)`` (every stage before the last) sends ``h``, which
  must be the output of this step's one forward of the stage's model, unmodified
  (same tensor, no in-place change, no later forward hook's replacement).
* ``dp.stage_backward()`` (the same stages) receives the gradient of ``h`` and
  backpropagates it from ``h``. It is the only backward such a stage may run:
  a backward elsewhere (a loss of an inner activation) is refused when its
  clipped sums reach the optimizer, and a gradient other than the received one
  reaching ``h`` (a tensor hook on ``h``) is refused.

Forwards without gradient (evaluation) pass through unchecked. Every receive
waits at most ``make_private(timeout=)`` seconds, then names the stage that
did not send (it stopped, raised or refused its step).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree

from swiftdp import distributed
from swiftdp.errors import ExampleMixingError, InvalidArgumentError, StepStructureError

__all__ = ["StageLink"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_DIMS = 8
_ACTIVATIONS, _GRADIENTS = 11, 12  # point-to-point tags (gloo; NCCL keeps the order)


class StageLink:
    """Sends a stage's activations on and their gradients back, and checks both ends.

    Args:
        model: this stage's model.
        stages: the pipeline's process group.
        stage: this stage's index.
        order: the rank of each stage (``order[k]`` holds stage ``k``).
    """

    def __init__(self, model: nn.Module, stages: distributed.Ranks, stage: int,
                 order: list[int]) -> None:
        self.model = model
        self.stage = stage
        self.prev = order[stage - 1] if stage > 0 else None
        self.next = order[stage + 1] if stage + 1 < len(order) else None
        self.control = stages.control
        self.timeout = stages.timeout
        self._depth = 0
        # Receiving end: the tensor handed to the loop, the model's leaf, its gradient.
        self.received: Tensor | None = None
        self.leaf: Tensor | None = None
        self.outgoing: Tensor | None = None
        self._watch: Any = None  # the hook on the model's outputs, until their gradient came
        # Sending end: this step's output, its version when recorded, whether sent.
        self.output: Tensor | None = None
        self.version = -1
        self.sent = False
        self.in_backward = False
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._post, always_call=True),
        ]

    @property
    def last(self) -> bool:
        """Whether this is the last stage (it computes the loss)."""
        return self.next is None

    def remove(self) -> None:
        """Detach the link's hooks from the model."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ------------------------------------------------------------ transport
    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return torch.device("cpu") if p is None else p.device

    def _send(self, t: Tensor, dst: int, tag: int) -> None:
        if t.dtype not in _DTYPES or t.dim() > _MAX_DIMS:
            raise InvalidArgumentError(
                f"Pipeline stage {self.stage} sends a tensor of dtype {t.dtype} with "
                f"{t.dim()} dimensions; stages exchange floating-point tensors of at most "
                f"{_MAX_DIMS} dimensions. Return one such tensor from the stage's model.")
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
        header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
        header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dist.send(header, dst, group=self.control, tag=tag)
        dist.send(t.detach().contiguous(), dst, tag=tag)

    def _recv(self, src: int, tag: int) -> Tensor:
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
        self._wait(dist.irecv(header, src, group=self.control, tag=tag), tag)
        ndim, code = int(header[0]), int(header[1])
        shape = [int(d) for d in header[2:2 + ndim]]
        t = torch.empty(shape, dtype=_DTYPES[code], device=self._device())
        self._wait(dist.irecv(t, src, tag=tag), tag)
        return t

    def _wait(self, work: Any, tag: int) -> None:
        what, peer = (("activations", self.stage - 1) if tag == _ACTIVATIONS
                      else ("the gradient of its activations", self.stage + 1))
        try:
            work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise StepStructureError(
                f"Pipeline stage {self.stage} waited {self.timeout:g} s for {what} from stage "
                f"{peer}, which did not send them: it stopped, raised or refused its step "
                f"(see its error), or runs another schedule. The backend said: "
                f"{' '.join(str(e).split())[:200]}") from e

    # -------------------------------------------------------- receiving end
    def receive(self) -> Tensor:
        """The previous stage's activations for this step's forward (detached).

        Raises:
            InvalidArgumentError: this is the first stage (it reads the data).
            StepStructureError: the activations received last were never run
                through the model.
        """
        if self.prev is None:
            raise InvalidArgumentError(
                "dp.receive_activations() is for pipeline stages after the first; stage 0 "
                "reads its batch from dp.data_loader.")
        if self.received is not None:
            raise StepStructureError(
                f"Pipeline stage {self.stage} received activations twice without running "
                "its model on the first ones. Call dp.model(dp.receive_activations()) once "
                "per batch (chunk).")
        self.received = self._recv(self.prev, _ACTIVATIONS)
        return self.received

    def _pre(self, module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._depth += 1
        if self._depth > 1 or not torch.is_grad_enabled() or _in_backward():
            return None  # a nested call (the independence probe's), evaluation, recompute
        if self.output is not None and not self.last:
            raise StepStructureError(
                f"Pipeline stage {self.stage} ran its model again before dp.stage_backward() "
                "of the previous output: one forward, one send, one stage_backward per batch "
                "(chunk). Two forwards backpropagated together could couple examples.")
        if self.prev is None:
            return None
        received = self.received
        if received is None:
            raise StepStructureError(
                f"Pipeline stage {self.stage} ran its model without activations from stage "
                f"{self.stage - 1}: call dp.model(dp.receive_activations()).")
        args, kwargs, found = _replace(args, kwargs, received, self._make_leaf(received))
        if not found:
            raise StepStructureError(
                f"Pipeline stage {self.stage} ran its model, but not on the tensor "
                "dp.receive_activations() returned: pass that tensor itself to the model "
                "(its gradient is what goes back to the previous stage).")
        self.received = None
        return args, kwargs

    def _make_leaf(self, received: Tensor) -> Tensor:
        leaf = received.detach().requires_grad_(True)
        self.leaf, self.outgoing = leaf, None
        return leaf

    def _watch_outputs(self, output: Any) -> None:
        """Receiving end: form the gradient to send back from the model's graph alone."""
        leaf = self.leaf
        outs = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
        if leaf is None or not outs:
            return
        self._unwatch()
        edges = [get_gradient_edge(t) for t in outs]  # (no tensor kept alive)

        def vjp(grads: Any) -> None:
            if not torch.autograd._is_checkpoint_valid():
                return  # a torch.autograd.grad pass (the loss check's): not the training backward
            self._unwatch()  # once: and the hook's references go with it
            pairs = [(e, g) for e, g in zip(edges, grads, strict=True) if g is not None]
            if self.outgoing is not None:
                raise StepStructureError(
                    f"Pipeline stage {self.stage}'s model outputs got a gradient twice: one "
                    "backward per batch (chunk).")
            if not pairs or self.leaf is not leaf:
                return
            # (inside torch.autograd.grad the engine captures nothing: not a training pass)
            (g,) = torch.autograd.grad([e for e, _ in pairs], [leaf], [g for _, g in pairs],
                                       retain_graph=True, allow_unused=True)
            self.outgoing = torch.zeros_like(leaf) if g is None else g.detach()

        self._watch = torch.autograd.graph.register_multi_grad_hook(outs, vjp, mode="all")

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def send_gradient(self) -> None:
        """After an accepted backward: send the received activations' gradient back."""
        if self.prev is None or self.leaf is None:
            return
        grad = self.outgoing if self.outgoing is not None else torch.zeros_like(self.leaf)
        self.leaf, self.outgoing = None, None
        self._send(grad, self.prev, _GRADIENTS)

    # ---------------------------------------------------------- sending end
    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth > 0 or output is None or not torch.is_grad_enabled() or _in_backward():
            return  # (None: the forward raised)
        if self.prev is not None:
            self._watch_outputs(output)
        if self.last:
            return
        if not isinstance(output, Tensor):
            raise InvalidArgumentError(
                f"A pipeline stage before the last must return one tensor (the activations "
                f"sent to the next stage), got {type(output).__name__}.")
        if output.requires_grad:
            self.output, self.version, self.sent = output, output._version, False

    def send(self, h: Tensor) -> None:
        """Send this step's output ``h`` to the next stage.

        Raises:
            InvalidArgumentError: this is the last stage.
            ExampleMixingError: ``h`` is not the output of this step's forward,
                or was changed in place since.
        """
        if self.next is None:
            raise InvalidArgumentError(
                "dp.send_activations(h) is for pipeline stages before the last; the last "
                "stage computes the loss and calls loss.backward().")
        if not h.requires_grad:  # evaluation: nothing comes back
            self._send(h, self.next, _ACTIVATIONS)
            return
        self._check_output(h, "dp.send_activations(h)")
        if self.sent:
            raise StepStructureError(
                f"Pipeline stage {self.stage} sent the same output twice; one send per "
                "forward.")
        self._send(h, self.next, _ACTIVATIONS)
        self.sent = True

    def _check_output(self, h: Tensor, call: str) -> None:
        if self.output is None or h is not self.output or h._version != self.version:
            raise ExampleMixingError(
                f"{call} on pipeline stage {self.stage} got a tensor that is not the stage "
                "model's output of this step as it returned (a function of it, a tensor "
                "changed in place, or an output replaced by a hook added after "
                "make_private). Only the model's own output may go to the next stage: a term "
                "added to it could couple examples, and this stage has no loss to check.")

    def backward(self) -> None:
        """Receive the gradient of the sent output and backpropagate it (one per batch).

        Raises:
            StepStructureError: nothing was sent in this step.
            ExampleMixingError: a gradient other than the received one reached
                the output (a tensor hook on it).
        """
        h = self.output
        if h is None or not self.sent:
            raise StepStructureError(
                f"dp.stage_backward() on pipeline stage {self.stage} before "
                "dp.send_activations(h) of this step's output.")
        self._check_output(h, "dp.stage_backward()")
        g = self._recv(self.next, _GRADIENTS)  # type: ignore[arg-type]
        if g.shape != h.shape:
            raise StepStructureError(
                f"Pipeline stage {self.stage} received a gradient of shape {tuple(g.shape)} "
                f"for its output of shape {tuple(h.shape)}.")
        g = g.to(h.dtype)

        def check(grad: Tensor) -> None:
            if not torch.equal(grad, g):
                raise ExampleMixingError(
                    f"The gradient reaching pipeline stage {self.stage}'s output is not the "
                    "one received from the next stage (a hook on the output changed it). It "
                    "could couple examples unchecked; leave the output's gradient alone.")

        h.register_hook(check)  # the last hook: it sees what the others made of g
        self.in_backward = True
        try:
            torch.autograd.backward([h], [g])
        finally:
            self.in_backward = False
            self.output, self.sent = None, False

    # ---------------------------------------------------------------- checks
    def check_delivery(self) -> None:
        """Refuse clipped sums of a backward other than :meth:`backward` (stages before the last).

        Raises:
            ExampleMixingError: the backward did not start from the received gradient.
        """
        if not self.last and not self.in_backward:
            raise ExampleMixingError(
                f"A backward pass on pipeline stage {self.stage} did not come from "
                "dp.stage_backward(): this stage has no loss the engine can check, so its "
                "only backward is the received gradient of its output. Compute every loss "
                "on the last stage.")

    def check_step(self) -> None:
        """Refuse a step with activations or gradients still in flight.

        Raises:
            StepStructureError: an output sent but not backpropagated, or
                activations received but not used.
        """
        if self.sent:
            raise StepStructureError(
                f"optimizer.step() on pipeline stage {self.stage} before dp.stage_backward(): "
                "the next stage's gradient of the sent activations was never received.")
        if self.received is not None:
            raise StepStructureError(
                f"optimizer.step() on pipeline stage {self.stage} with received activations "
                "the model never ran on.")
        self.output = None
        self._unwatch()


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any], old: Tensor,
             new: Tensor) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    found = False

    def swap(v: Any) -> Any:
        nonlocal found
        if v is old:
            found = True
            return new
        return v

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}, found


def _in_backward() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)
