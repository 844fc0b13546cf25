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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from swiftdp.checks import (
    check_clipping,
    check_cost_objective,
    check_loss_reduction,
    check_max_grad_norm,
    check_mode,
    check_module_options,
    check_no_batch_mixing,
)
from swiftdp.clipping import generic, nanobatch
from swiftdp.clipping.boundary import wrap_outputs
from swiftdp.clipping.clip_fns import ClippingStyle, clip_factors, nonfinite_examples
from swiftdp.clipping.contributions import (
    Contribution,
    NormOnly,
    param_sq_norms,
    param_weighted_sum,
)
from swiftdp.clipping.cost import CostObjective, ModePolicy
from swiftdp.clipping.escapes import ParameterGuard
from swiftdp.clipping.loss_check import check_loss
from swiftdp.clipping.tracer import Capture, ModuleCall, Tracer
from swiftdp.errors import UnsupportedModuleError

Mode = Literal["bk", "ghost", "per_sample", "nanobatch"]
MODES: tuple[str, ...] = ("bk", "ghost", "per_sample", "nanobatch")
LossReduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class BackwardResult:
    """What one backward pass produced, handed to the engine's sink.

    Attributes:
        sums: ``(parameter, Σ_i c_i g_i)`` for every trainable parameter of the
            step (zeros for a parameter no example reached).
        batch_size: the batch size of the forward that was differentiated.
        forwards: how many forward passes of the model fed this backward.
    """

    sums: list[tuple[Tensor, Tensor]]
    batch_size: int
    forwards: int


Sink = Callable[[BackwardResult], None]


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
        max_grad_norm: the clipping threshold ``C``.
        clipping: ``"flat"`` or ``"automatic"`` (see :func:`clip_factors`).
        mode: ``"bk"``, ``"ghost"``, ``"per_sample"`` or ``"nanobatch"``.
        loss_reduction: how the loss combines examples: ``"mean"`` (the
            per-example gradient is ``B`` times the captured one) or ``"sum"``.
            Per-token losses averaged over ``B·T`` tokens give per-example
            means over tokens.
        batch_first: whether sequence activations are ``(B, T, ...)``;
            ``False`` for ``(T, B, ...)`` models.
        cost_objective: ``"time"`` or ``"memory"``, what the per-layer cost
            model minimises.
        sink: receives each backward's clipped sums instead of ``p.grad``
            (``make_private`` keeps them private until the noisy step).
            Default: add them to ``p.grad``.

    Raises:
        UnsupportedModuleError: the model has a layer that mixes examples
            (BatchNorm); ``swiftdp.fix(model)`` swaps it for GroupNorm.
        InvalidArgumentError: an argument is out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        *,
        clipping: ClippingStyle = "flat",
        mode: Mode = "bk",
        loss_reduction: LossReduction = "mean",
        batch_first: bool = True,
        cost_objective: CostObjective = "time",
        sink: Sink | None = None,
    ) -> None:
        check_max_grad_norm(max_grad_norm)
        check_clipping(clipping)
        check_mode(mode, MODES)
        check_loss_reduction(loss_reduction)
        check_cost_objective(cost_objective)
        check_no_batch_mixing(model)

        self.model = model
        self._max_grad_norm = float(max_grad_norm)
        self.clipping: ClippingStyle = clipping
        self.mode: Mode = mode
        self.loss_reduction: LossReduction = loss_reduction
        self.batch_first = batch_first
        self.cost_objective: CostObjective = cost_objective
        self.last_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None

        self._tracer = Tracer(self)
        self._trainable: dict[int, Tensor] = {}
        self._names: dict[int, str] | None = None
        self._batch_size = 0
        self._root_active: list[bool] = []
        self._root_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self._suspended = False
        self._contribs: list[Contribution] = []
        self._generic_params: dict[int, set[int]] = {}
        self._captures_pending: list[Capture] = []
        self._queued = False
        self._generation = 0
        self._pass2 = False
        self._pass2_weights: Tensor | None = None
        self._pass2_sums: dict[int, tuple[Tensor, Tensor]] = {}
        self._uses: dict[int, int] = {}
        self._handles: list[Any] = []
        self._sink: Sink = sink if sink is not None else _add_to_grads
        # Escape guard: a hook on every trainable parameter that fires when
        # autograd accumulates into it. Every use the engine routes is
        # detached, so any firing is a gradient that bypassed clipping.
        self._guard = ParameterGuard(model, self._name_of)
        self._hooked_modules: set[int] = set()
        self._session_root: nn.Module | None = None
        self._forward_id = 0
        self._forwards_seen: set[int] = set()
        self._sessions = 0  # forwards since the last backward
        self._last_outputs: list[Tensor] = []
        self._loss_checked: set[Any] = set()
        self._reduction_override: str | None = None
        self._ignore_grads = False
        self._dropped: Tensor | None = None
        self._attach()
        self._refresh_params()

    # ----------------------------------------------------------------- hooks
    @property
    def max_grad_norm(self) -> float:
        """The clipping threshold ``C`` (fixed for the engine's lifetime)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        raise AttributeError(
            f"Cannot set max_grad_norm={value!r} on a GradClipper: the threshold C is part "
            "of the privacy guarantee (the noise and the accountant read it). Under "
            "make_private it is fixed for the run; build a new GradClipper to use another C."
        )

    def _attach(self) -> None:
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(
            root.register_forward_hook(self._root_post, with_kwargs=True, always_call=True)
        )
        self._hooked_modules.add(id(root))
        self._hook_modules()

    def _hook_modules(self) -> None:
        """Hook every module with parameters not hooked yet (modules added later too)."""
        for path, m in self.model.named_modules():
            if id(m) in self._hooked_modules or not any(True for _ in m.parameters(recurse=False)):
                continue
            self._hooked_modules.add(id(m))
            self._handles.append(m.register_forward_pre_hook(self._make_pre(path), with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(self._make_post(), with_kwargs=True, always_call=True)
            )

    def _refresh_params(self) -> dict[int, Tensor]:
        """Enumerate the trainable parameters now (each guarded against escapes)."""
        trainable, added = self._guard.refresh()
        if added:  # new parameters may come with new modules
            self._names = None
            self._hook_modules()
        return trainable

    def trainable_parameters(self) -> list[Tensor]:
        """The model's trainable parameters now (each guarded against escapes)."""
        self._trainable = self._refresh_params()
        return list(self._trainable.values())

    def _name_of(self, p: Tensor) -> str:
        self._names = None
        return self._param_names().get(id(p), "<a parameter no longer in the model>")

    def add_probe(self, probe: Any) -> None:
        """Keep ``probe`` (anything with ``remove()``) attached for the engine's lifetime."""
        self._handles.append(probe)

    @property
    def is_suspended(self) -> bool:
        """Whether the engine is suspended (see :meth:`suspended`)."""
        return self._suspended

    def remove(self) -> None:
        """Detach the engine from the model (hooks removed, model untouched)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._guard.remove()
        self._hooked_modules.clear()

    @property
    def _tracing(self) -> bool:
        return bool(self._root_active) and self._root_active[0] and self.mode != "nanobatch"

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._root_active:  # a recursive call of the root module
            self._root_active.append(False)
            if self._tracing and not self._suspended:
                self._push(module, "<model>", args, kwargs)
                self._root_active[-1] = True
            return
        active = not self._suspended and torch.is_grad_enabled()
        if active and _in_backward():
            raise UnsupportedModuleError(
                f"Module `{self._module_path(module)}` is run inside a backward pass "
                "(activation checkpointing such as torch.utils.checkpoint or "
                "gradient_checkpointing_enable() recomputes it there). swiftdp does not "
                "support activation checkpointing yet: turn it off for private training."
            )
        self._root_active.append(active)
        if not active:
            return
        self._session_root = module
        self._forward_id += 1
        # Filled during a backward only: a leftover is from an aborted one.
        self._forwards_seen = set()
        self._sessions += 1
        self._trainable = self._refresh_params()
        # Contributions only exist during a backward; leftovers mean the last
        # backward raised, so start clean.
        self._queued = False
        self._captures_pending = []
        self._contribs = []
        self._uses = {}
        self._tracer.views.clear()
        self._tracer.captures = []
        self._tracer.batch_token = object()
        self._names = None
        self._batch_size = _batch_size(args, kwargs, 0 if self.batch_first else 1)
        self._root_args = (args, kwargs)
        if self.mode == "nanobatch":
            check_module_options(module)  # no tracer in this mode: check modules here
            return
        self._mark_inputs(args, kwargs)
        self._tracer.__enter__()
        self._push(module, "<model>", args, kwargs)

    def _root_post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not self._root_active:
            return None
        active = self._root_active.pop()
        if not active:
            return None
        if self._root_active:  # inner recursive call
            return self._module_post(module, args, kwargs, output)
        self._session_root = None
        if self.mode == "nanobatch":
            a, kw = self._root_args
            self._root_args = ((), {})
            self._check_single_forward()
            return self._record_outputs(
                wrap_outputs(self, output, nanobatch.make_backward(self, module, a, kw)))
        try:
            new_out = self._module_post(module, args, kwargs, output)
        finally:
            self._tracer.stack.clear()
            self._tracer.captures = []  # needed during the forward only; they hold activations
            self._tracer.__exit__(None, None, None)
        out = output if new_out is None else new_out
        if self.mode == "ghost":
            self._check_single_forward()
            return self._record_outputs(wrap_outputs(self, out, self._ghost_backward))
        self._record_outputs(out)
        return new_out

    def _record_outputs(self, output: Any) -> Any:
        """Remember the forward's output tensors (for the per-example loss check)."""
        self._last_outputs = [t for t in pytree.tree_leaves(output)
                              if isinstance(t, Tensor) and t.requires_grad]
        return output

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
            InvalidArgumentError: ``losses`` is neither ``(B,)`` nor a scalar.
            ExampleMixingError: an example's loss depends on another example.
        """
        outs, bd = self._last_outputs, (0 if self.batch_first else 1)
        sig = (tuple(losses.shape), tuple(_shape_without(t, bd, self._batch_size) for t in outs))
        if sig not in self._loss_checked:
            with self._ignoring_grads():
                check_loss(losses, outs, self._batch_size, bd)
            self._loss_checked.add(sig)
        if losses.dim() == 0:
            losses.backward()
            return
        self._reduction_override = "sum"
        try:
            losses.sum().backward()
        finally:
            self._reduction_override = None

    @contextlib.contextmanager
    def _ignoring_grads(self) -> Iterator[None]:
        prev = self._ignore_grads
        self._ignore_grads = True
        try:
            yield
        finally:
            self._ignore_grads = prev

    def _make_pre(self, path: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._root_active:
                # A submodule called from outside the model's own call: it is
                # the root of this forward (exact for the parameters it uses).
                if not self._suspended and torch.is_grad_enabled():
                    self._root_pre(module, args, kwargs)
                return
            if self._tracing and not self._suspended and torch.is_grad_enabled():
                self._push(module, path, args, kwargs)

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
        bd, batch, tr = 0 if self.batch_first else 1, self._batch_size, self._tracer
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.dim() > 0:
                d = bd if t.dim() > max(bd, 1) else 0
                if t.shape[d] == batch:
                    tr.mark_batched(t, d)

    def _policy(self) -> ModePolicy:
        """The mode's choices for the rules' builds (the second ghost pass forms sums only)."""
        return ModePolicy(self.mode, self.cost_objective, second_pass=self._pass2)

    def _check_single_forward(self) -> None:
        """Ghost and nanobatch modes clip at their own output node: one forward per backward."""
        if self._sessions > 1:
            self._sessions = 0
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
        return generic.capture_module_output(self, call, output)

    # --------------------------------------------------------------- backward
    def _receive(self, cap: Capture, index: int, grad: Tensor) -> None:
        """Output-gradient hook: store the gradient; build contributions once complete."""
        if self._ignore_grads:  # the library's own loss check, not a training backward
            return
        if cap.generation != self._generation:
            cap.generation = self._generation
            cap.grads = [None] * len(cap.grads)
            cap.seen = 0
            if self._cancelled(cap):
                cap.seen = -1
                return
            self._captures_pending.append(cap)
            self._forwards_seen.add(cap.forward_id)
        if cap.seen < 0:
            return
        cap.grads[index] = grad
        cap.seen += 1
        if not self._queued and self.mode in ("bk", "per_sample"):
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
        if cap.seen == len(cap.grads):  # complete: build now, free what is not needed
            self._captures_pending.remove(cap)
            self._contribs.extend(self._build(cap))

    def _build(self, cap: Capture) -> list[Contribution]:
        out = cap.build(cap.grads, self._policy())
        cap.grads = [None] * len(cap.grads)
        if self._pass2:
            # Ghost clipping, second pass: reduce each use to its clipped sum at
            # once (the weighted sum is linear, so uses simply add up).
            w = self._pass2_weights
            assert w is not None
            for c in out:
                s = param_weighted_sum(c.param, [c], w, self._dropped, detect=False)
                prev = self._pass2_sums.get(id(c.param))
                self._pass2_sums[id(c.param)] = (c.param, s if prev is None else prev[1] + s)
            return []
        for c in out:
            c.sq_norms()
        if self.mode == "ghost" and not self._pass2:
            # First pass: a parameter used once needs only its norms.
            out = [NormOnly(c) if self._uses.get(id(c.param), 0) <= 1 else c for c in out]
        return out

    def _cancelled(self, cap: Capture) -> bool:
        for cid in cap.call_ids:
            ids = self._generic_params.get(cid)
            if ids and cap.param_ids & ids:
                return True
        return False

    def _collect(self) -> list[Contribution]:
        for cap in self._captures_pending:
            self._contribs.extend(self._build(cap))
        self._captures_pending = []
        out, self._contribs = self._contribs, []
        return out

    def _norms(self, by_param: dict[int, list[Contribution]]) -> Tensor | None:
        sq: Tensor | None = None
        for uses in by_param.values():
            s = param_sq_norms(uses)
            sq = s if sq is None else sq + s.to(sq.dtype)
        return sq

    def _scale(self, batch: int) -> float:
        reduction = self._reduction_override or self.loss_reduction
        return float(batch) if reduction == "mean" else 1.0

    def _clip(self, sq: Tensor) -> tuple[Tensor, float]:
        scale = self._scale(sq.shape[0])
        norms = sq.clamp(min=0).sqrt() * scale
        # One check per step: examples with a non-finite norm get factor 0 and
        # are left out of every clipped sum exactly (one example must never
        # be able to poison the update).
        self._dropped = nonfinite_examples(norms)
        c = clip_factors(norms, self.max_grad_norm, self.clipping, warn_nonfinite=False)
        self.last_norms, self.last_clip_factors = norms.detach(), c.detach()
        return c, scale

    def _finalize(self) -> None:
        """End of the backward pass: norms → clip factors → clipped sums to the sink."""
        self._queued = False
        self._generation += 1
        by_param = _group(self._collect())
        self._generic_params.clear()
        sq = self._norms(by_param)
        sums: dict[int, Tensor] = {}
        if sq is not None:
            c, scale = self._clip(sq)
            weights = c * scale
            for pid, uses in by_param.items():
                sums[pid] = param_weighted_sum(uses[0].param, uses, weights, self._dropped,
                                               detect=False)
        self._deliver(sums)

    def _deliver(self, sums: dict[int, Tensor]) -> None:
        """Hand one backward's clipped sums (zeros where none) to the sink."""
        forwards = len(self._forwards_seen)
        self._forwards_seen = set()
        self._sessions = 0
        out = [
            (p, sums[pid].detach() if pid in sums else torch.zeros_like(p))
            for pid, p in self._trainable.items()
        ]
        self._sink(BackwardResult(out, self._batch_size, forwards))

    def _ghost_backward(self, outs: list[Tensor], grads: list[Tensor]) -> None:
        """Ghost clipping: one backward for the norms, a second for the clipped sums.

        The second pass replays the same output gradients; each layer forms
        its clipped sum ``Σ_i w_i G_i`` as soon as its gradient arrives and
        frees everything else, so no layer's factors outlive its backward.
        """
        self._generation += 1
        torch.autograd.backward(outs, grads, retain_graph=True)
        sq = self._norms(_group(self._collect()))
        if sq is None:
            self._generic_params.clear()
            self._deliver({})
            return
        c, scale = self._clip(sq)
        self._generation += 1
        self._pass2 = True
        self._pass2_weights = (c * scale).detach()
        self._pass2_sums = {}
        try:
            torch.autograd.backward(outs, grads)
            self._collect()
            sums = self._pass2_sums
        finally:
            self._pass2 = False
            self._pass2_weights = None
            self._pass2_sums = {}
            self._generic_params.clear()
        self._deliver({pid: total for pid, (_, total) in sums.items()})

    def _param_names(self) -> dict[int, str]:
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


def _group(contribs: list[Contribution]) -> dict[int, list[Contribution]]:
    by: dict[int, list[Contribution]] = {}
    for c in contribs:
        by.setdefault(id(c.param), []).append(c)
    return by


def _add_to_grads(result: BackwardResult) -> None:
    """The default sink: add each clipped sum to ``p.grad`` (the low-level contract)."""
    for p, s in result.sums:
        s = s.to(p.dtype)
        if p.grad is None:
            p.grad = s
        else:
            p.grad.add_(s)


def _shape_without(t: Tensor, bd: int, batch: int) -> tuple[int, ...]:
    d = bd if t.dim() > max(bd, 1) else 0
    return tuple(-1 if i == d and n == batch else n for i, n in enumerate(t.shape))


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
