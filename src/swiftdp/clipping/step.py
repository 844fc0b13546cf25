"""One step of the engine: its forward(s), their captures, and the backward that clips.

A :class:`Step` is created by :class:`~swiftdp.clipping.engine.GradClipper` at
the first root forward after the last step was handed over, and dropped by the
engine once its backward delivered. Everything that lives for one forward and
its backward is here — the batch, the captured parameter uses, the per-layer
contributions, the norms and clip factors — so the long-lived clipper holds
configuration only, and a backward can only ever combine the examples of the
forward(s) it differentiates.

Each capture holds its step; an output-gradient hook hands the gradient to
that step alone (:meth:`Step.receive`). When the backward pass ends
(:meth:`Step.finalize`, queued on autograd's graph task) the norms over every
trainable parameter give the clip factors, each parameter's clipped sum is
formed, and the sums go to the engine's sink as one :class:`BackwardResult`.
In group mode (``max_grad_norm={prefix: C_k}``) each group's parameters give
that group's per-example norms and factors, and each parameter's clipped sum
uses its own group's factors; with one ``C`` the path is unchanged.
A retained graph may be differentiated again: every pass over it delivers
its own result (and ``make_private`` refuses the second one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swiftdp.clipping import loss_trace
from swiftdp.clipping.clip_fns import (
    Thresholds,
    clip_factors,
    nonfinite_examples,
    unweightable_as_inf,
)
from swiftdp.clipping.contributions import (
    Contribution,
    NormOnly,
    param_weighted_sum,
    total_sq_norms,
)
from swiftdp.clipping.cost import ModePolicy
from swiftdp.clipping.deferred import read_host, to_host_async
from swiftdp.clipping.early import EarlyGroups
from swiftdp.clipping.loss_check import OutputRef, check_loss
from swiftdp.clipping.rounding import device_constant, engine_precision
from swiftdp.errors import ExampleMixingError, InvalidArgumentError, UnsupportedModuleError

if TYPE_CHECKING:
    from swiftdp.clipping.capture import Capture
    from swiftdp.clipping.engine import GradClipper


@dataclass(frozen=True)
class BackwardResult:
    """What one backward pass produced, handed to the engine's sink.

    Attributes:
        sums: ``(parameter, Σ_i c_i g_i)`` for every trainable parameter of the
            step (zeros for a parameter no example reached).
        batch_size: the batch size of the forward that was differentiated.
        forwards: how many forward passes of the model fed this backward.
        thresholds: what the examples were clipped to (``C``, or the groups'
            ``((prefix, C_k), ...)``): the optimizer's noise must match it.
        within: ``(K,)`` float64, per group (one without groups), how many
            examples had a gradient norm at most their threshold (a non-finite
            norm counts as above): what adaptive clipping estimates its
            quantile from.
    """

    sums: list[tuple[Tensor, Tensor]]
    batch_size: int
    forwards: int
    thresholds: Thresholds = 0.0
    within: Tensor | None = None


Sink = Callable[[BackwardResult], None]


class ForwardToken:
    """The mark of the tensors derived from one forward's batch.

    Tensors carry it (see :mod:`swiftdp.clipping.batchdim`), so it points to
    its step weakly: a tensor kept by the user never keeps a step alive.
    """

    __slots__ = ("__weakref__", "_step", "index")

    def __init__(self, step: Step, index: int) -> None:
        self._step = weakref.ref(step)
        self.index = index

    @property
    def step(self) -> Step | None:
        """The step of this forward, while it is alive."""
        return self._step()


class Step:
    """The state of one step: the forward(s) since the last backward, and that backward.

    Args:
        engine: the clipper, read for its configuration (mode, clipping,
            threshold, loss reduction) only.
        deliver: receives each backward's result (the engine forwards it to
            its sink and drops the step).
    """

    def __init__(self, engine: GradClipper,
                 deliver: Callable[[Step, BackwardResult], None]) -> None:
        self.engine = engine
        self._on_deliver = deliver
        self.trainable: dict[int, Tensor] = {}
        self.batch_size = 0
        self.forwards = 0  # forwards joined since the step began
        self.token: ForwardToken | None = None
        self.root_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        # Forward state: the captures of the forward in progress (a generic
        # module call takes over the parameters of the captures inside it),
        # detached slices of trainable parameters (id -> (view, parameter,
        # region)), and how often each parameter is used.
        self.captures: list[Capture] = []
        self.views: dict[int, tuple[Tensor, Tensor, tuple[slice, ...]]] = {}
        self.uses: dict[int, int] = {}
        self.outputs: list[OutputRef] = []  # gradient edges and shapes: no tensor kept
        # A recomputation of activation checkpointing in progress: "replay"
        # (non-reentrant: its graph is never differentiated, its captures are
        # inert) or "join" (reentrant: its captures are this step's).
        self.recompute: str | None = None
        # Backward state.
        self.generic_params: dict[int, set[int]] = {}
        self.pending: list[Capture] = []
        self.contribs: list[Contribution] = []
        self.early: EarlyGroups | None = None  # group mode: groups clipped during the backward
        self.queued = False
        self.generation = 0
        self.started = False
        self.pass2 = False
        self.pass2_weights: Tensor | None = None  # (B,), or (K, B) in group mode
        self.group_ids: dict[int, int] | None = None  # parameter id -> group (group mode)
        self.pass2_sums: dict[int, tuple[Tensor, Tensor]] = {}
        self.forwards_seen: set[int] = set()
        self.dropped: Tensor | None = None
        self.norms: Tensor | None = None  # per-example norms, (B,) or (K, B), once clipped
        self.clipped_with: Thresholds | None = None  # the thresholds read when clipping
        self.reduction_override: str | None = None
        self.loss_signature: Any = None  # set when the outputs were handed out traced
        self.loss_checked = False  # the traced loss of this step was checked (or skipped)
        self.ignore_grads = False
        # Verdicts of a sync-free step read before delivery: (host copy, event, why).
        self.deferred_flags: list[tuple[Tensor, Any, str]] = []

    # ---------------------------------------------------------------- forward
    def begin_forward(self, trainable: dict[int, Tensor], batch_size: int,
                      args: tuple[tuple[Any, ...], dict[str, Any]]) -> ForwardToken:
        """Join a new forward to the step; returns the token its batch is marked with."""
        self.forwards += 1
        self.trainable = trainable
        self.batch_size = batch_size
        self.root_args = args
        self.views.clear()
        self.captures = []
        self.token = ForwardToken(self, self.forwards)
        return self.token

    def end_forward(self) -> None:
        """The root forward returned: the capture list is needed during the forward only."""
        self.captures = []
        self.root_args = ((), {})

    def count_use(self, pid: int) -> None:
        """Count one use of a parameter (ghost mode keeps norms only for single uses)."""
        self.uses[pid] = self.uses.get(pid, 0) + 1

    @property
    def policy(self) -> ModePolicy:
        """The mode's choices for the rules' builds (the second ghost pass forms sums only)."""
        eng = self.engine
        return ModePolicy(eng.mode, eng.cost_objective, second_pass=self.pass2)

    def output_signature(self, batch_dim: int) -> tuple[tuple[int, ...], ...]:
        """The outputs' shapes with the batch left out: what the loss checks are cached by."""
        return tuple(_shape_without(t, batch_dim, self.batch_size) for t in self.outputs)

    def backward_losses(self, losses: Tensor, batch_dim: int, checked: set[Any]) -> None:
        """Backpropagate per-example losses (or a scalar), checked once per signature.

        See :meth:`GradClipper.backward`. ``checked`` holds the signatures
        (loss rank, output shapes without the batch) already checked.
        """
        form = loss_trace.form_of(losses)
        with torch._C.DisableTorchFunctionSubclass():
            if form is not None and form.kind == "coupled":
                self._refuse(form, "sum")
            ctx = getattr(losses, "sdp_ctx", None)
            sig = (losses.dim(), self.output_signature(batch_dim),
                   None if ctx is None else ctx.fingerprint())
            if sig not in checked and self._check_loss(losses, batch_dim, form):
                checked.add(sig)  # (not when a non-finite value made it inconclusive)
            if form is not None:
                self._refuse(form, self.engine.loss_reduction, scalar=losses.dim() == 0)
            self.loss_checked = True  # the backward below is not checked again
            if losses.dim() == 0:
                losses.backward()
                return
            self.reduction_override = "sum"
            try:
                losses.sum().backward()
            finally:
                self.reduction_override = None

    def loss_pending(self) -> bool:
        """Whether this step's loss is still to be backpropagated (it is the current step)."""
        return not self.loss_checked and self.engine.current_step is self

    def check_traced_loss(self, loss: Tensor, form: loss_trace.Form) -> None:
        """``loss.backward()`` on a checked step's traced loss: refuse a misdeclared one.

        Runs before any gradient flows, until a backward of this step passes
        (a refused loss is refused again if its backward is retried); a loss
        of another step, or of an engine no longer in it, is left alone.
        """
        eng = self.engine
        if self.loss_checked or eng.current_step is not self:
            return
        try:
            with torch._C.DisableTorchFunctionSubclass():
                if form.kind == "coupled":
                    self._refuse(form, "mean")
                ctx = getattr(loss, "sdp_ctx", None)
                sig = (0, self.output_signature(eng.batch_dim),
                       None if ctx is None else ctx.fingerprint())
                if sig not in eng.checked_losses and loss.dim() == 0:
                    # first: cross-example terms get the most specific refusal
                    if self._check_loss(loss, eng.batch_dim, form):
                        eng.checked_losses.add(sig)  # else: checked again next step
                self._refuse(form, self.reduction_override or eng.loss_reduction)
        except Exception:
            eng.loss_check_failed(self)  # a caught refusal does not turn the check off
            raise
        self.loss_checked = True  # (a token mean's labels are read again next step: traced)

    def _refuse(self, form: loss_trace.Form, reduction: str, *, scalar: bool = True) -> None:
        why = loss_trace.verdict(form, reduction, self.batch_size, scalar=scalar)
        if why is None:
            return
        if form.kind == "coupled":
            raise ExampleMixingError(why)
        raise InvalidArgumentError(why)

    def _check_loss(self, losses: Tensor, batch_dim: int,
                    form: loss_trace.Form | None = None) -> bool:
        """The second-derivative check (the user's retained output gradients left as they were).

        Returns ``False`` when it was not conclusive (a non-finite derivative on
        this batch): the signature is checked again at its next step.
        """
        ctx = getattr(losses, "sdp_ctx", None)
        kept = ctx.retained() if ctx is not None else []
        self.ignore_grads = True
        try:
            return check_loss(losses, self.outputs, self.batch_size, batch_dim)
        except (RuntimeError, NotImplementedError) as e:
            # No second derivative (ctc_loss, cdist): a loss whose form the trace
            # read as a reduction over per-example rows needs none.
            if form is None or form.kind != "total" or losses.dim() != 0:
                raise InvalidArgumentError(
                    "swiftdp cannot check this loss for cross-example terms: its second "
                    f"derivative is not available ({type(e).__name__}: {str(e)[:120]}). Pass "
                    "one loss per example to dp.backward(losses) (computed from each example's "
                    "own outputs), or check_loss=False if the loss is known to decompose."
                ) from e
            return True
        finally:
            self.ignore_grads = False
            for t, g in kept:
                t.grad = g

    # --------------------------------------------------------------- backward
    def ensure_finalize(self) -> None:
        """Queue :meth:`finalize` at the end of the backward pass running now."""
        if not self.queued and self.engine.mode in ("bk", "per_sample"):
            self.queued = True
            self.started = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finalize)

    @engine_precision
    def receive(self, cap: Capture, index: int, grad: Tensor) -> None:
        """Output-gradient hook: store the gradient; build contributions once complete."""
        if self.ignore_grads or not torch.autograd._is_checkpoint_valid():
            # The library's own loss check, or a torch.autograd.grad / backward(inputs=)
            # pass (FGSM, logging): not a training backward, nothing to deliver.
            return
        if grad.dtype in _HALF and (self.reduction_override or self.engine.loss_reduction) == "mean":
            raise InvalidArgumentError(MEAN_IN_HALF.format(dtype=grad.dtype))
        self.started = True
        if cap.generation != self.generation:
            cap.generation = self.generation
            cap.grads = [None] * len(cap.grads)
            cap.seen = 0
            if self._cancelled(cap):
                cap.seen = -1
                return
            self.pending.append(cap)
            self.forwards_seen.add(cap.forward_index)
        if cap.seen < 0:
            return
        if cap.seen >= len(cap.grads) or cap.grads[index] is not None:
            # A second gradient for one output in one backward: a nested backward
            # (reentrant checkpointing) reached it apart from the outer one.
            raise UnsupportedModuleError(
                "A tensor of this forward received its gradient in two parts in one "
                "backward pass: it is used both inside a torch.utils.checkpoint("
                "use_reentrant=True) region and outside it without being one of the "
                "checkpoint's positional inputs (a closure, a functools.partial keyword). "
                "Its per-example gradient would be split. Pass it to the checkpoint "
                "positionally, or use use_reentrant=False."
            )
        cap.grads[index] = grad
        cap.seen += 1
        self.ensure_finalize()
        if cap.seen == len(cap.grads):  # complete: build now, free what is not needed
            self.pending.remove(cap)
            built = self._build(cap)
            if self.early is None and self._clips_groups_early():
                self.early = EarlyGroups(self)
            if self.early is not None:  # group mode: clip each group once it is complete
                self.early.built(self, cap, built)
            else:
                self.contribs.extend(built)

    def _build(self, cap: Capture) -> list[Contribution]:
        out = cap.build(cap.grads, self.policy)
        cap.grads = [None] * len(cap.grads)
        if self.pass2:
            # Ghost clipping, second pass: reduce each use to its clipped sum at
            # once (the weighted sum is linear, so uses simply add up).
            w = self.pass2_weights
            assert w is not None
            gid = self.group_ids
            for c in out:
                wc = w if gid is None else w[_group_of(gid, c.param)]
                s = param_weighted_sum(c.param, [c], wc, self.dropped, detect=False)
                prev = self.pass2_sums.get(id(c.param))
                self.pass2_sums[id(c.param)] = (c.param, s if prev is None else prev[1] + s)
            return []
        for c in out:
            c.sq_norms()
        if self.engine.mode == "ghost":
            # First pass: a parameter used once needs only its norms.
            out = [NormOnly(c) if self.uses.get(id(c.param), 0) <= 1 else c for c in out]
        return out

    def _clips_groups_early(self) -> bool:
        eng = self.engine
        return (eng.group_limits is not None and eng.mode in ("bk", "per_sample")
                and eng.clip_groups_in_backward and not self.pass2)

    def _cancelled(self, cap: Capture) -> bool:
        for cid in cap.call_ids:
            ids = self.generic_params.get(cid)
            if ids and cap.param_ids & ids:
                return True
        return False

    def _collect(self) -> list[Contribution]:
        for cap in self.pending:
            self.contribs.extend(self._build(cap))
        self.pending = []
        out, self.contribs = self.contribs, []
        return out

    def scale(self, batch: int) -> float:
        """Factor from the captured gradients to per-example ones (``B`` for a mean loss)."""
        reduction = self.reduction_override or self.engine.loss_reduction
        return float(batch) if reduction == "mean" else 1.0

    def _clip(self, sq: Tensor) -> tuple[Tensor, float]:
        """Norms → clip factors: ``sq`` is ``(B,)``, or ``(K, B)`` (one row per group)."""
        eng = self.engine
        scale = self.scale(sq.shape[-1])
        norms = sq.clamp(min=0).sqrt() * scale
        limits = eng.group_limits
        # One check per step: examples with a non-finite norm get factor 0 and
        # are left out of every clipped sum exactly (one example must never
        # be able to poison the update); in group mode a non-finite norm in
        # any group drops the example from all of them.
        pending = eng.pending_for(norms.device)
        if limits is None:
            c_max = eng.max_grad_norm
            assert isinstance(c_max, float)
            norms = unweightable_as_inf(norms, c_max, scale, eng.clipping)
            self.dropped = nonfinite_examples(norms, pending=pending)
            c = clip_factors(norms, c_max, eng.clipping, warn_nonfinite=False)
        else:
            norms = torch.stack([unweightable_as_inf(n, ck, scale, eng.clipping)
                                 for n, ck in zip(norms, limits, strict=True)])
            self.dropped = nonfinite_examples(norms.amax(0), pending=pending)
            c = torch.stack([clip_factors(n, ck, eng.clipping, warn_nonfinite=False)
                             for n, ck in zip(norms, limits, strict=True)])
        eng.last_norms, eng.last_clip_factors = norms.detach(), c.detach()
        self.norms = norms.detach()
        self.clipped_with = eng.max_grad_norm
        return c, scale

    def _step_norms(self, by_param: dict[int, list[Contribution]]) -> Tensor | None:
        """Squared norms over all parameters ``(B,)``, or per group ``(K, B)`` in group mode."""
        self.group_ids = gid = self.engine.group_ids(self.trainable)
        if gid is None:
            return _norms(by_param)
        limits = self.engine.group_limits
        assert limits is not None
        parts: list[list[list[Contribution]]] = [[] for _ in limits]
        for uses in by_param.values():
            parts[_group_of(gid, uses[0].param)].append(uses)
        sq = [total_sq_norms(p) for p in parts]
        known = next((t for t in sq if t is not None), None)
        if known is None:
            return None
        return torch.stack([known.new_zeros(known.shape) if t is None else t for t in sq])

    @engine_precision
    def finalize(self) -> None:
        """End of the backward pass: norms → clip factors → clipped sums to the sink.

        Raises:
            InvalidArgumentError: the step's outputs were handed out traced and
                the loss reached the layers without passing the loss check (a
                loss formed from a plain tensor taken out of an output, e.g.
                ``out.as_subclass(torch.Tensor)``): nothing is delivered.
        """
        self.queued = False
        self.generation += 1
        if self.loss_signature is not None and not self.loss_checked:
            self.early = None
            raise InvalidArgumentError(
                "This backward reached the model without passing swiftdp's loss check: the "
                "loss was formed from a plain tensor taken out of the model's output (e.g. "
                "out.as_subclass(torch.Tensor), or a tensor built with its data), so "
                "swiftdp cannot tell whether it couples examples. Compute the loss from the "
                "output itself, or hand one loss per example to dp.backward(losses); "
                "check_loss=False turns the check off.")
        early, self.early = self.early, None
        if early is not None:
            rest = self._collect()
            self.generic_params.clear()
            self.deliver(early.finish(self, rest))
            return
        by_param = _group(self._collect())
        self.generic_params.clear()
        sq = self._step_norms(by_param)
        sums: dict[int, Tensor] = {}
        if sq is not None:
            c, scale = self._clip(sq)
            weights = c * scale
            gid = self.group_ids
            for pid, uses in by_param.items():
                w = weights if gid is None else weights[gid[pid]]
                sums[pid] = param_weighted_sum(uses[0].param, uses, w, self.dropped,
                                               detect=False)
        self.deliver(sums)

    def defer_flag(self, flag: Tensor, why: str) -> bool:
        """Take a loss-form flag to check before delivery, if this step runs sync-free.

        Args:
            flag: a 0-dim bool tensor, true when the loss couples examples.
            why: the reason, for the refusal.

        Returns:
            ``True`` when the flag was deferred (its copy to the host started),
            ``False`` when it must be read now (a CPU step).
        """
        if self.engine.pending_for(flag.device) is None:
            return False
        host, event = to_host_async(flag)
        # Filed with the step in progress: a loss may mix in an output of an earlier,
        # delivered step (whose context traced this op) — that step never delivers again.
        current = self.engine.current_step
        owner = current if current is not None else self
        owner.deferred_flags.append((host, event, why))
        return True

    def _check_deferred(self) -> None:
        """Refuse the step, before anything is delivered, if a deferred flag is set.

        The flags are kept while any is set: a retried backward of the same
        graph (the refusal caught) is refused again.
        """
        for host, event, why in self.deferred_flags:
            if read_host(host, event):
                self.engine.loss_check_failed(self)
                self._refuse(loss_trace.coupled(why), "mean")
        self.deferred_flags = []

    def deliver(self, sums: dict[int, Tensor]) -> None:
        """Hand one backward's clipped sums (zeros where none) to the sink.

        Raises:
            ExampleMixingError: a sync-free step's deferred loss-form flag says
                the loss couples examples (nothing is delivered).
        """
        self._check_deferred()
        # The recorded outputs reach the autograd graph, whose hooks close over
        # this step: a cycle through C++ that Python's gc cannot collect. Dropping
        # them here lets the step, its captures and the forward's activations go.
        self.outputs = []
        forwards = len(self.forwards_seen)
        self.forwards_seen = set()
        out = [
            (p, sums[pid].detach() if pid in sums else torch.zeros_like(p))
            for pid, p in self.trainable.items()
        ]
        eng = self.engine
        # What the examples were clipped to, read when they were (a threshold changed
        # since, e.g. from a hook during ghost's second pass, is reported as it was used).
        used = self.clipped_with if self.clipped_with is not None else eng.max_grad_norm
        limits = tuple(c for _, c in used) if isinstance(used, tuple) else (float(used),)
        if self.norms is None:  # no example reached a parameter: every norm is 0
            dev = next((p.device for p in self.trainable.values()), None)
            within = torch.full((len(limits),), float(self.batch_size), dtype=torch.float64,
                                device=dev)
        else:
            n = self.norms.double().reshape(len(limits), -1)
            top = device_constant(limits, n.device)[:, None]  # not rebuilt from a list
            within = (n <= top).sum(1).double()
        self.norms, self.clipped_with = None, None
        self._on_deliver(self, BackwardResult(out, self.batch_size, forwards, used, within))

    def ghost_backward(self, outs: list[Tensor], grads: list[Tensor]) -> None:
        """Ghost clipping: one backward for the norms, a second for the clipped sums.

        The second pass replays the same output gradients; each layer forms
        its clipped sum ``Σ_i w_i G_i`` as soon as its gradient arrives and
        frees everything else, so no layer's factors outlive its backward.
        """
        self.started = True
        self.generation += 1
        torch.autograd.backward(outs, grads, retain_graph=True)
        sq = self._step_norms(_group(self._collect()))
        if sq is None:
            self.generic_params.clear()
            self.deliver({})
            return
        c, scale = self._clip(sq)
        self.generation += 1
        self.pass2 = True
        self.pass2_weights = (c * scale).detach()
        self.pass2_sums = {}
        try:
            torch.autograd.backward(outs, grads)
            self._collect()
            sums = self.pass2_sums
        finally:
            self.pass2 = False
            self.pass2_weights = None
            self.pass2_sums = {}
            self.generic_params.clear()
        self.deliver({pid: total for pid, (_, total) in sums.items()})


_HALF = (torch.bfloat16, torch.float16)
MEAN_IN_HALF = (
    "The model's output gradients are {dtype} (torch.autocast or 16-bit parameters) and the "
    "loss is a mean over the batch (loss_reduction='mean'): each example's gradient is then "
    "(∂ℓ_i/∂out)/B rounded to 16 bits, so its rounding depends on the batch size and one "
    "example's presence moves every other example's clipped gradient (measured: sensitivity "
    "1.025·C at B = 1536). Sum the loss over the batch (F.cross_entropy(..., "
    "reduction='sum')) and pass loss_reduction='sum' (make_private divides by the expected "
    "batch size either way), or hand over one loss per example with dp.backward(losses).")


def _group(contribs: list[Contribution]) -> dict[int, list[Contribution]]:
    by: dict[int, list[Contribution]] = {}
    for c in contribs:
        by.setdefault(id(c.param), []).append(c)
    return by


def _norms(by_param: dict[int, list[Contribution]]) -> Tensor | None:
    return total_sq_norms(by_param.values())


def _group_of(gid: dict[int, int], param: Tensor) -> int:
    """The group of a parameter that received a per-example gradient (group mode)."""
    k = gid.get(id(param))
    if k is None:  # not trainable at this step's forward: never summed without a group
        raise UnsupportedModuleError(
            f"A parameter of shape {tuple(param.shape)} received a per-example gradient but "
            "was not among the model's trainable parameters when the forward began, so it "
            "has no clipping group. Freeze or unfreeze parameters between steps only."
        )
    return k


def _shape_without(t: Tensor | OutputRef, bd: int, batch: int) -> tuple[int, ...]:
    d = bd if t.dim() > max(bd, 1) else 0
    return tuple(-1 if i == d and n == batch else n for i, n in enumerate(t.shape))
