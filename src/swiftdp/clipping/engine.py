"""The clipping engine: exact per-example clipping for an unmodified ``nn.Module``.

After ``loss.backward()`` every trainable parameter's ``.grad`` holds the
clipped sum ``Σ_i c_i g_i`` of its per-example gradients, ``c_i`` computed
from each example's gradient norm over *all* trainable parameters. Noise,
the division by the expected batch size and the optimiser step belong to
:mod:`swiftdp.optim`.

Modes (speed choices; the clipped sum is the same in all of them):

* ``"bk"`` (default, book-keeping): one backward pass. Rules capture
  activations and output gradients; per layer and per batch a cost model picks
  ghost norm or instantiation; at the end of the backward the norms give
  ``c`` and each layer forms its clipped sum with one more weight-gradient
  matmul. The non-private weight gradient is never computed.
* ``"ghost"``: two backward passes, the first for norms only, the second with
  output gradients scaled by ``c``: least memory.
* ``"per_sample"``: book-keeping with every per-example gradient instantiated.
* ``"nanobatch"``: each example's gradient by its own forward and backward
  (batch size 1 with accumulation); slow, simple, the test oracle.

References:
    Bu et al. Differentially private optimization on large model at small
    cost. ICML 2023. Li et al. Large language models can be strong
    differentially private learners. ICLR 2022. Bu, Mao, Xu. NeurIPS 2022.
    Graphcore. NanoBatch privacy. 2021.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from swiftdp.checks import (
    check_clipping,
    check_cost_objective,
    check_loss_reduction,
    check_mode,
    check_module_options,
    check_no_batch_mixing,
)
from swiftdp.clipping import batchdim, generic, loss_trace, nanobatch, recompute, views
from swiftdp.clipping.boundary import wrap_outputs
from swiftdp.clipping.clip_fns import ClippingStyle, Thresholds, group_thresholds
from swiftdp.clipping.compiled import prepare_compiled
from swiftdp.clipping.cost import CostObjective
from swiftdp.clipping.deferred import PendingCounts
from swiftdp.clipping.escapes import ParameterGuard
from swiftdp.clipping.groups import GroupPartition, check_clip_thresholds
from swiftdp.clipping.hook_check import check_no_backward_hooks
from swiftdp.clipping.loss_check import OutputRef
from swiftdp.clipping.module_hooks import DroppedOnCopy
from swiftdp.clipping.step import BackwardResult, ForwardToken, Sink, Step
from swiftdp.clipping.tracer import ModuleCall, Tracer
from swiftdp.errors import InvalidArgumentError, UnsupportedModuleError
from swiftdp.hf.labels import ModelLoss, TokenReduction, is_hf_model

__all__ = ["MODES", "BackwardResult", "GradClipper", "LossReduction", "Mode", "Sink"]

Mode = Literal["bk", "ghost", "per_sample", "nanobatch"]
MODES: tuple[str, ...] = ("bk", "ghost", "per_sample", "nanobatch")
LossReduction = Literal["mean", "sum"]

_OFF, _FORWARD, _JOIN, _REPLAY = recompute.OFF, recompute.FORWARD, recompute.JOIN, recompute.REPLAY


class GradClipper:
    """Attach exact per-example clipping to a model, without replacing any module.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> clipper = GradClipper(model, max_grad_norm=1.0)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()  # p.grad = Σ_i c_i g_i for every trainable p
        >>> bool((clipper.last_norms >= 0).all())
        True

    Args:
        model: the model, unchanged; hooks are attached to it and removed by
            :meth:`remove`.
        max_grad_norm: the clipping threshold ``C``; or group-wise clipping
            (He et al. 2022), ``{module-name prefix: C_k}``: every trainable
            parameter must be in exactly one group (``n == prefix`` or
            ``n.startswith(prefix + ".")``), and each example's gradient
            restricted to group ``k`` is clipped to ``C_k`` on its own, with
            its own norm — sensitivity ``√Σ_k C_k²``. All modes support it.
        clipping: ``"flat"`` or ``"automatic"`` (see :func:`clip_factors`).
        mode: ``"bk"``, ``"ghost"``, ``"per_sample"`` or ``"nanobatch"``.
        loss_reduction: how the loss combines examples: ``"mean"`` (the
            per-example gradient is ``B`` times the captured one) or ``"sum"``.
            Per-token losses averaged over ``B·T`` tokens give per-example
            means over tokens.
        batch_first: whether sequence activations are ``(B, T, ...)``;
            ``False`` for ``(T, B, ...)`` models.
        cost_objective: what the per-layer cost model minimises: ``"time"``
            or ``"memory"``; ``"ghost"`` or ``"instantiate"`` force that side
            for every factored layer (to measure it). Speed and memory only:
            the clipped sum is the same.
        sink: receives each backward's clipped sums instead of ``p.grad``
            (``make_private`` keeps them private until the noisy step).
            Default: add them to ``p.grad``.
        check_loss: on the first forward of each output signature, hand the
            outputs back as :class:`~swiftdp.clipping.loss_trace.Traced`
            tensors and check the loss at its backward: a reduction that does
            not match ``loss_reduction`` or couples examples is refused, and the
            loss's second derivative must have no cross-example terms (one extra
            backward through the loss only, never the model). ``False`` skips it.
        token_reduction: for a Hugging Face model called with ``labels=``, each
            example's loss over its own real tokens: ``"mean"`` or ``"sum"``
            (:class:`~swiftdp.hf.labels.ModelLoss` replaces the model's token
            mean over the whole batch, which couples examples).
        augmult: augmentation multiplicity (De et al. 2022), ``K`` views of
            each example clipped as one example: a training forward takes its
            batched arguments as ``(B, K, ...)`` and the model runs on
            ``(B·K, ...)``; outputs come back ``(B, K, ...)``
            (:mod:`~swiftdp.clipping.views`).

    Attributes:
        last_norms: the last backward's per-example gradient norms, ``(B,)``;
            in group mode ``(K, B)``, row ``k`` the norms of group ``k``.
        last_clip_factors: the clip factors, shaped like ``last_norms``.
        sync_free: run the step without host synchronisation: examples with a
            non-finite norm are dropped by a mask formed on the device every
            step and their warning arrives later (:mod:`~swiftdp.clipping.deferred`).
            ``None`` (the default): on for norms off the CPU, off on the CPU
            (where reading a value waits for nothing, and the mask is formed
            only when something is off).

    Raises:
        UnsupportedModuleError: the model has a layer that mixes examples
            (BatchNorm); ``swiftdp.fix(model)`` swaps it for GroupNorm.
        InvalidArgumentError: an argument is out of range, or the groups of
            ``max_grad_norm`` do not partition the trainable parameters
            (naming the parameter in none or in two).
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: Thresholds | Mapping[str, float],
        *,
        clipping: ClippingStyle = "flat",
        mode: Mode = "bk",
        loss_reduction: LossReduction = "mean",
        batch_first: bool = True,
        cost_objective: CostObjective = "time",
        sink: Sink | None = None,
        check_loss: bool = True,
        token_reduction: TokenReduction = "mean",
        augmult: int = 1,
    ) -> None:
        thresholds = check_clip_thresholds(max_grad_norm)
        self.augmult = views.check_augmult(augmult)
        if self.augmult > 1 and not batch_first:
            raise InvalidArgumentError(
                f"augmult={augmult} needs batch_first=True: the views of each example are "
                "dimension 1 of a (B, K, ...) batch.")
        check_clipping(clipping)
        check_mode(mode, MODES)
        check_loss_reduction(loss_reduction)
        check_cost_objective(cost_objective)
        model, compiled_hooks = prepare_compiled(model, mode)  # torch.compile: see compiled.py
        check_no_batch_mixing(model)

        self.model = model
        self._max_grad_norm: Thresholds = thresholds
        self._group_limits = group_thresholds(thresholds)
        self.clipping: ClippingStyle = clipping
        self.mode: Mode = mode
        self.loss_reduction: LossReduction = loss_reduction
        self.batch_first = batch_first
        self.cost_objective: CostObjective = cost_objective
        self.last_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None
        # Group mode in bk / per_sample: clip each group once its last use has its
        # gradient, during the backward (clipping/early.py); False: all at the end.
        self.clip_groups_in_backward = True
        self.sync_free: bool | None = None
        self._pending = PendingCounts()

        self._sink: Sink = sink if sink is not None else _add_to_grads
        self._tracer = Tracer(self)
        # The step in progress: created at the first forward after the last
        # delivery, dropped when its backward delivers (see clipping/step.py).
        self._step: Step | None = None
        self._last_step: weakref.ref[Step] | None = None
        self._last_delivery: tuple[int, weakref.ref[Step]] | None = None
        # Hook bookkeeping: one entry per module call in flight (_OFF,
        # _FORWARD, or a checkpoint recomputation), and the call that began it.
        self._root_active: list[int] = []
        self._sessions = recompute.Sessions(self._tracer, self._root_active, lambda: self._suspended)
        self._session_root: nn.Module | None = None
        self._suspended = False
        self._handles: list[Any] = []
        self._hooked_modules: set[int] = set()
        self._names: dict[int, str] | None = None
        self.checked_losses: set[Any] = set()  # (loss rank, output signature) checked
        self.check_loss = bool(check_loss)
        self._loss_uses: dict[Any, int] = {}  # forwards per output signature
        # Escape guard: a hook on every trainable parameter that fires when
        # autograd delivers a gradient to it. Every use the engine routes is
        # detached, so any such gradient bypassed clipping.
        self._guard = ParameterGuard(model, self._name_of, lambda: self._suspended)
        # A bad partition (or an unused group) is refused before any hook is attached.
        self._groups = None if not isinstance(thresholds, tuple) else GroupPartition(
            model, thresholds)
        self._attach()
        self._refresh_params()
        if is_hf_model(model):  # its labels= loss, per example (hooks run before ours)
            self._handles.append(ModelLoss(model, lambda: self.loss_reduction,
                                           token_reduction, lambda: not self._suspended))
        self.add_probe(compiled_hooks.attach(lambda: self._suspended))  # after ours

    # ----------------------------------------------------------------- hooks
    @property
    def max_grad_norm(self) -> Thresholds:
        """The clipping threshold ``C``, or the groups' ``((prefix, C_k), ...)`` (fixed)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        raise AttributeError(
            f"Cannot set max_grad_norm={value!r} on a GradClipper: the threshold C is part "
            "of the privacy guarantee (the noise reads it). Under make_private change it "
            "between steps with dp.set_max_grad_norm(C) (noise and clipping follow "
            "together); on a bare GradClipper call set_max_grad_norm(C)."
        )

    def set_max_grad_norm(self, max_grad_norm: Thresholds | Mapping[str, float]) -> None:
        """Clip to a new threshold from the next forward on (a schedule, adaptive clipping).

        Under ``make_private`` call ``dp.set_max_grad_norm`` instead: the
        optimizer's noise must follow, and it refuses sums clipped to another
        threshold than its own.

        Args:
            max_grad_norm: the new ``C``; with groups, the same prefixes (in
                the same order) with new thresholds.

        Raises:
            InvalidArgumentError: a threshold that is not positive and finite,
                groups where there were none (or the reverse, or other prefixes).

        Each backward clips to the threshold in force when it runs, and says
        which in its :class:`BackwardResult`.
        """
        new = check_clip_thresholds(max_grad_norm)
        old = self._max_grad_norm
        same_shape = (isinstance(new, tuple) and isinstance(old, tuple)
                      and [p for p, _ in new] == [p for p, _ in old]) or (
            not isinstance(new, tuple) and not isinstance(old, tuple))
        if not same_shape:
            raise InvalidArgumentError(
                f"set_max_grad_norm got {max_grad_norm!r}, but this run clips to "
                f"{old!r}: a new threshold keeps the structure (one C, or the same groups in "
                "the same order) and changes the values only.")
        self._max_grad_norm = new
        self._group_limits = group_thresholds(new)

    @property
    def group_limits(self) -> tuple[float, ...] | None:
        """The groups' thresholds ``(C_1, ..., C_K)`` in group mode, else ``None`` (fixed)."""
        return self._group_limits

    def group_ids(self, trainable: dict[int, Tensor]) -> dict[int, int] | None:
        """The group index of each trainable parameter (``None`` with one threshold ``C``).

        Checked whenever the set of trainable parameters changes (a parameter
        unfrozen or added later must fall in exactly one group too).

        Raises:
            InvalidArgumentError: a trainable parameter is in no group or in two.
        """
        return None if self._groups is None else self._groups.ids(trainable)

    def _attach(self) -> None:
        root = self.model
        # (DroppedOnCopy: a deep copy of the model, an EMA teacher, is a plain model)
        self._handles.append(
            root.register_forward_pre_hook(DroppedOnCopy(self._root_pre), with_kwargs=True))
        self._handles.append(root.register_forward_hook(
            DroppedOnCopy(self._root_post), with_kwargs=True, always_call=True))
        self._hooked_modules.add(id(root))
        self._hook_modules()

    def _hook_modules(self) -> None:
        """Hook every module with parameters not hooked yet (modules added later too)."""
        for path, m in self.model.named_modules():
            if id(m) in self._hooked_modules or not any(True for _ in m.parameters(recurse=False)):
                continue
            self._hooked_modules.add(id(m))
            self._handles.append(m.register_forward_pre_hook(
                DroppedOnCopy(self._make_pre(path)), with_kwargs=True))
            self._handles.append(m.register_forward_hook(
                DroppedOnCopy(self._make_post()), with_kwargs=True, always_call=True))

    def _refresh_params(self) -> dict[int, Tensor]:
        """Enumerate the trainable parameters now (each guarded against escapes)."""
        trainable, added = self._guard.refresh()
        if added:  # new parameters may come with new modules
            self._names = None
            self._hook_modules()
        return trainable

    def trainable_parameters(self) -> list[Tensor]:
        """The model's trainable parameters now (each guarded against escapes)."""
        return list(self._refresh_params().values())

    def _name_of(self, p: Tensor) -> str:
        self._names = None
        return self.param_names().get(id(p), "<a parameter no longer in the model>")

    def add_probe(self, probe: Any) -> None:
        """Keep ``probe`` (anything with ``remove()``) attached for the engine's lifetime."""
        self._handles.append(probe)

    @property
    def is_suspended(self) -> bool:
        """Whether the engine is suspended (see :meth:`suspended`)."""
        return self._suspended

    def pending_for(self, device: torch.device) -> PendingCounts | None:
        """Where a sync-free step on ``device`` queues its counts; ``None`` off that mode."""
        free = self.sync_free if self.sync_free is not None else device.type != "cpu"
        return self._pending if free else None

    def report_pending(self) -> None:
        """Emit the warnings of sync-free steps not read yet (waits for the device)."""
        self._pending.poll(wait=True)

    def remove(self) -> None:
        """Detach the engine from the model (hooks removed, model untouched).

        Warns:
            NonFiniteGradientWarning: for sync-free steps not reported yet
                (after the hooks are removed).
        """
        try:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._guard.remove()
            self._hooked_modules.clear()
        finally:
            self.report_pending()

    @property
    def _tracing(self) -> bool:
        return bool(self._root_active) and self._root_active[0] != _OFF and self.mode != "nanobatch"

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._root_active:  # a recursive call of the root module
            self._root_active.append(_OFF)
            if self._tracing and not self._suspended:
                self._push(module, "<model>", args, kwargs)
                self._root_active[-1] = _FORWARD
            return None
        active = not self._suspended and torch.is_grad_enabled()
        if active and _in_backward():
            self._begin_recompute(module, args, kwargs)
            return None
        if active and self.group_limits is not None:  # refuse a parameter outside the groups
            self.group_ids(self._refresh_params())  # before any state of this call is set
        if active:
            check_no_backward_hooks(module)  # (before any state of this call is set)
        self._root_active.append(_FORWARD if active else _OFF)
        if not active:
            return None
        self._session_root = module
        loss_trace.forward_begins()
        step = self._step
        if step is None or step.started:  # leftovers of a backward that raised are dropped
            step = self._new_step()
        trainable = self._refresh_params()
        batch = _batch_size(args, kwargs, 0 if self.batch_first else 1)
        token = step.begin_forward(trainable, batch, (args, kwargs))
        self._names = None
        if self.mode == "nanobatch":
            check_module_options(module)  # no tracer in this mode: check modules here
        k = self.augmult
        if k > 1:
            views.check_views(args, kwargs, batch, k)
        if self.mode == "nanobatch":  # (no tracer: plain views)
            return views.merge_views(args, kwargs, batch, k, check=False) if k > 1 else None
        self._tracer.begin(step, token)
        self._mark_inputs(args, kwargs)
        self._tracer.__enter__()
        if k > 1:  # under the tracer: the rows are marked as the views of their example
            args, kwargs = views.merge_views(args, kwargs, batch, k, check=False)
        self._push(module, "<model>", args, kwargs)
        return (args, kwargs) if k > 1 else None

    def _new_step(self) -> Step:
        old = self._step
        if old is not None:
            # A forward never differentiated (or whose backward raised): its
            # recorded outputs would keep it, and its graph, alive in a cycle.
            old.outputs = []
        step = self._step = Step(self, self._on_deliver)
        self._last_step = weakref.ref(step)
        return step

    def _on_deliver(self, step: Step, result: BackwardResult) -> None:
        if self._step is step:
            self._step = None  # the step is over: the next forward begins a new one
        if self._sink is _add_to_grads:
            # The low-level contract: one step per backward pass (make_private's
            # optimizer checks the structure of every step itself).
            task = torch._C._current_graph_task_id()
            last = self._last_delivery
            if task != -1 and last is not None and last[0] == task and last[1]() is not step:
                raise UnsupportedModuleError(
                    "One backward pass differentiated the graphs of two forwards (a graph "
                    "kept with retain_graph=True and a new forward): their examples would be "
                    "clipped apart and summed twice into .grad. Backpropagate each forward's "
                    "loss on its own."
                )
            self._last_delivery = (task, weakref.ref(step))
        self._sink(result)

    def _root_post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not self._root_active:
            return None
        state = self._root_active.pop()
        if state == _OFF:
            return None
        if state != _FORWARD:
            return self._end_recompute(module, args, kwargs, output)
        if self._root_active:  # inner recursive call
            return self._module_post(module, args, kwargs, output)
        self._session_root = None
        step = self._step
        assert step is not None
        if self.mode == "nanobatch":
            a, kw = step.root_args
            step.end_forward()
            self._check_single_forward(step)
            if self.augmult > 1:
                output = views.split_views(output, step.batch_size, self.augmult)
            return self._record_outputs(step, wrap_outputs(
                self._tracer.anchor, output, nanobatch.make_backward(self, step, module, a, kw)))
        try:
            new_out = self._module_post(module, args, kwargs, output)
            if self.augmult > 1:
                token = step.token
                new_out = views.split_views(
                    output if new_out is None else new_out, step.batch_size, self.augmult,
                    lambda t: batchdim.merged(t, token) == (0, self.augmult))
        finally:
            self._tracer.stack.clear()
            step.end_forward()  # the capture list holds activations: the forward is over
            self._tracer.__exit__(None, None, None)
        out = output if new_out is None else new_out
        if self.mode == "ghost":
            self._check_single_forward(step)
            return self._record_outputs(
                step, wrap_outputs(self._tracer.anchor, out, step.ghost_backward))
        return self._record_outputs(step, out)

    # ------------------------------------------------- activation checkpointing
    def _begin_recompute(self, module: nn.Module, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
        """A module run inside a backward pass: a checkpoint's recomputation, or refused."""
        kind = recompute.kind()
        path = self._module_path(module)
        if kind is None:
            raise UnsupportedModuleError(
                f"Module `{path}` is run inside a backward pass (from a backward hook?), "
                "outside activation checkpointing. Its gradients would not be clipped with "
                "the examples of their step: run the model in the forward pass only."
            )
        if self.mode == "nanobatch":  # each example is recomputed alone, engine suspended
            self._root_active.append(_OFF)
            return
        token = recompute.token_of((args, kwargs), _live_token)
        step = token.step if isinstance(token, ForwardToken) else None
        if step is None:
            # No input carries the batch: the original forward routed the call
            # without one too. Replaying only refills autograd's activations.
            step = self._step or (self._last_step() if self._last_step else None)
        if kind == "join" or step is None:
            raise UnsupportedModuleError(
                f"Module `{path}` is recomputed by activation checkpointing "
                "(use_reentrant=True) whose first run swiftdp did not trace (the checkpoint "
                "was called outside the model's forward), so its gradients cannot be clipped "
                "with their examples. Call the checkpoint inside the model's forward, or use "
                "use_reentrant=False."
            )
        self._root_active.append(_REPLAY)
        self._session_root = module
        self._tracer.begin_recompute(step, token if isinstance(token, ForwardToken) else None,
                                     "replay")
        self._tracer.__enter__()
        self._push(module, path, args, kwargs)

    def _end_recompute(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        try:
            return self._module_post(module, args, kwargs, output)
        finally:
            self._session_root = None
            self._tracer.__exit__(None, None, None)
            self._tracer.end_recompute()

    def _record_outputs(self, step: Step, output: Any) -> Any:
        """Remember the forward's outputs for the loss checks; hand back aliases of them.

        Their gradient edges and shapes only: holding the tensors would keep
        them (the logits of a language model) alive through the loss backward.
        The user gets a view of each output (a :class:`~swiftdp.clipping.loss_trace.Traced`
        one at every step when the loss is checked), so ``torch.autograd.grad(loss, out)`` stops at
        the view and never reaches the layers' output-gradient hooks: a
        gradient for logging is not a training backward.
        """
        carried = loss_trace.forward_ends()
        views, originals = loss_trace.plain_views(output)  # one pass on the per-step path
        step.outputs = [OutputRef(t) for t in originals]
        if not step.outputs:
            return output
        if self.check_loss and step.batch_size >= 2:
            sig = step.output_signature(self.batch_dim)
            # Traced at every step: the loss's form is read (and refused if it couples
            # examples or misstates the reduction) before every backward, and the
            # second-derivative check runs for each new fingerprint of the operations
            # that form the loss (a term switched on later is checked at once), and
            # again at the 2nd, 4th, 8th, ... forward of a signature (data-dependent
            # couplings behind the same operations).
            uses = self._loss_uses[sig] = self._loss_uses.get(sig, 0) + 1
            if uses & (uses - 1) == 0:
                self.checked_losses.difference_update(
                    [k for k in self.checked_losses if k[1] == sig])
            step.loss_signature, step.loss_checked = sig, False
            ctx = loss_trace.Context(step.batch_size, step.check_traced_loss, step.defer_flag,
                                    step.loss_pending)
            token = step.token

            def axis_of(t: Tensor) -> int | None:
                carries, dim = batchdim.read(t, token)
                return dim if carries else None

            return loss_trace.trace_outputs(output, step.batch_size, self.batch_dim, ctx,
                                            axis_of, carried)
        return views

    # ------------------------------------------------------ per-example loss
    def backward(self, losses: Tensor) -> None:
        """Backpropagate the loss of each example: the unambiguous way to state a loss.

        ``losses[i]`` must be example ``i``'s own loss (for a sequence, e.g. the
        mean over its own real tokens: :func:`swiftdp.losses.per_example_cross_entropy`).
        Their sum is differentiated, so the clipped unit is exactly each entry,
        whatever ``loss_reduction`` says. On the first call and whenever the
        output shapes change, it checks that each entry depends on its own
        example's outputs only (two extra backward passes through the loss,
        not through the model). A 0-dim loss is backpropagated with the
        declared ``loss_reduction``, after checking that it has no cross-example
        second-order terms (contrastive or pairwise losses).

        Args:
            losses: shape ``(B,)``, the batch of the last forward; or a scalar.

        Raises:
            InvalidArgumentError: ``losses`` is neither ``(B,)`` nor a scalar, or
                no forward ran since the last backward.
            ExampleMixingError: an example's loss depends on another example.
        """
        step = self._step
        if step is None:
            raise InvalidArgumentError(
                "backward(losses) needs the forward of these losses: call the model first "
                "(no forward ran since the last backward)."
            )
        step.backward_losses(losses, self.batch_dim, self.checked_losses)

    @property
    def batch_dim(self) -> int:
        """The batch dimension of sequence activations: 0 (``batch_first``) or 1."""
        return 0 if self.batch_first else 1

    def loss_check_failed(self, step: Step) -> None:
        """A step's loss was refused: check its signature's losses in full again next time."""
        sig = step.loss_signature
        self.checked_losses.difference_update([k for k in self.checked_losses if k[1] == sig])

    @property
    def current_step(self) -> Step | None:
        """The step in progress (its forward ran, it has not delivered), if any."""
        return self._step

    def _make_pre(self, path: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._root_active:
                # A submodule called from outside the model's own call: it is
                # the root of this forward (exact for the parameters it uses).
                if not self._suspended and torch.is_grad_enabled():
                    self._root_pre(module, args, kwargs)
                return
            if self._tracing and not self._suspended:
                if torch.is_grad_enabled():
                    if self._root_active[0] == _FORWARD:
                        # Inside a non-reentrant checkpoint's first run?
                        frame = recompute.checkpoint_frame()
                        if frame is not None:
                            recompute.wrap_replay(self._sessions, frame)
                    self._push(module, path, args, kwargs)
                elif self._root_active[0] in (_FORWARD, _JOIN):
                    # No gradient here: maybe reentrant checkpointing's first run.
                    recompute.wrap_reentrant(self._sessions, module, path)

        return pre

    def _make_post(self) -> Callable[..., Any]:
        def post(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if module is self._session_root and len(self._root_active) == 1:
                return self._root_post(module, args, kwargs, output)
            return self._module_post(module, args, kwargs, output)

        return post

    def _mark_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Mark the model's inputs that carry the batch: batch tracking starts there."""
        bd, batch, tr = 0 if self.batch_first else 1, self._tracer.batch_size, self._tracer
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.dim() > 0:
                d = bd if t.dim() > max(bd, 1) else 0
                if t.shape[d] == batch:
                    tr.mark_batched(t, d)

    def _check_single_forward(self, step: Step) -> None:
        """Ghost and nanobatch modes clip at their own output node: one forward per backward."""
        if step.forwards > 1:
            self._step = None
            raise UnsupportedModuleError(
                f"mode={self.mode!r} needs the model called once per backward pass, through "
                "`model(x)`, but this is its second forward (or a second submodule called "
                "from outside the model, as `model.forward(x)` does) since the last backward. "
                "Call `model(x)` once per backward, or use mode='bk'."
            )

    def _module_path(self, module: nn.Module) -> str:
        for path, m in self.model.named_modules():
            if m is module:
                return path or "<model>"
        return type(module).__name__

    def _push(self, module: nn.Module, path: str, args: Any, kwargs: Any) -> None:
        tr = self._tracer
        tr.stack.append(ModuleCall(module, path, next(tr._ids), args, kwargs))

    def _module_post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        tr = self._tracer
        if not tr.stack or tr.stack[-1].module is not module:
            return None
        call = tr.stack.pop()
        if not call.generic:
            return None
        return generic.capture_module_output(self, tr, call, output)

    def param_names(self) -> dict[int, str]:
        if self._names is None:
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        return self._names

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run model code with the engine out of the way (no tracing, no capture).

        For the library's own probes (the independence check); gradients of a
        backward through a suspended forward are not clipped, so only use it
        under ``torch.no_grad()``.
        """
        prev = self._suspended
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = prev

    def __enter__(self) -> GradClipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _add_to_grads(result: BackwardResult) -> None:
    """The default sink: add each clipped sum to ``p.grad`` (the low-level contract).

    Row ``i`` of every forward feeding one backward is clipped as one example
    (submodules called directly, ``model.forward(x)``); two model calls on
    different batches in one backward are the caller's to avoid (``make_private``
    refuses them).
    """
    for p, s in result.sums:
        s = s.to(p.dtype)
        if p.grad is None:
            p.grad = s
        else:
            p.grad.add_(s)


def _live_token(token: object) -> bool:
    return isinstance(token, ForwardToken) and token.step is not None


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass on this thread."""
    return bool(torch._C._current_graph_task_id() != -1)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any], bd: int) -> int:
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, Tensor) and t.dim() > 0:
            if t.dim() > bd and t.dim() >= 2:
                return int(t.shape[bd])
            return int(t.shape[0])
    return 0
