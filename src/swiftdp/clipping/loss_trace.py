"""How the loss is formed from the model's outputs, read at every step.

At every step the engine hands the model's outputs back as :class:`Traced`
tensors. Every torch operation on them runs
as usual (the same numbers, attached to the same graph) and records, on the
result, what it did to the batch: a :class:`Form` (rules in
:mod:`swiftdp.clipping.loss_forms`). When the loss built from them is
backpropagated (``loss.backward()``, ``torch.autograd.backward``), the
engine reads the loss's form *before any gradient flows* and refuses

* a form it cannot read (an operation outside the ones it models): it cannot
  tell whether the loss decomposes, so the scalar path refuses it with the
  operation's name — pass per-example losses to ``dp.backward(losses)``;
* per-example weights that depend on the batch: a reduction other than the
  declared one (``.sum()`` under ``loss_reduction="mean"``, a mean under
  ``"sum"``, ``loss * B``), a sum mixed with a mean, a ``cross_entropy`` /
  ``nll_loss`` mean over targets with ``ignore_index`` entries or class
  weights, a mean over a selection of the batch (``losses[mask].mean()``,
  ``nanmean``), a division by a count (an integer tensor, or a number that is
  neither ``B`` nor the batch's token count);

then checks the loss's second derivative at the outputs for cross-example
terms (:func:`~swiftdp.clipping.loss_check.check_loss`) whenever the loss's
fingerprint — the operations on the traced tensors, with which of their
plain numbers are zero — is new for the output signature, and again at the
2nd, 4th, 8th, ... step of a signature. A tensor hook registered on a traced
tensor may read its gradient, never change it
(:func:`~swiftdp.clipping.hook_check.read_only_hook`). A token mean over
the batch whose targets happened to have no padding keeps its signature
traced, so a later padded batch is refused too.

A loss scaled by a ``torch.amp.GradScaler`` (``scaler.scale(loss)``) is
refused where it is scaled: the engine would clip the scaled per-example
gradients (threshold ``C / scale`` once unscaled), and the scaler's inf
check and step skipping would read the clipped sums before the noise.
"""

from __future__ import annotations

import copy
import inspect
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from dataclasses import replace as dc_replace
from typing import Any

import torch
import torch.amp.grad_scaler as _grad_scaler
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.errors import InvalidArgumentError

_FIX = ("Hand over one loss per example instead — dp.backward(losses) with losses[i] "
        "example i's own loss (swiftdp.losses.per_example_cross_entropy, or "
        "swiftdp.losses.causal_lm_loss for token sequences) — or, if this loss is an "
        "equal-weight mean (sum) over the examples, match loss_reduction to it; "
        "check_loss=False turns the check off.")


@dataclass(frozen=True, slots=True)
class Form:
    """What a tensor is, as a function of the batch.

    Attributes:
        kind: ``"rows"`` (entry blocks along ``axis`` belong to one example
            each), ``"total"`` (reduced over the batch: each example's terms
            weighted ``B ** power``), ``"coupled"`` (the weights depend on the
            batch) or ``"unknown"`` (formed by an operation not modelled).
        axis: for ``rows``, the dimension holding the batch.
        per: for ``rows``, the consecutive entries of ``axis`` per example
            (``T`` after flattening ``(B, T, V)`` to ``(B*T, V)``); for a
            ``total``, that of the rows it reduced.
        power: for ``total``, the exponent of ``B`` in each example's weight
            (0: a sum, -1: a mean, 1: a mean times ``B``).
        why: for ``coupled`` the reason; for ``unknown`` the operation.
        relabel: a ``cross_entropy``/``nll_loss`` mean whose targets had no
            ``ignore_index`` entry on this batch: it couples examples on the
            first padded one, so the signature stays traced.
        tokens: per-token losses (``cross_entropy``/``nll_loss`` with one
            target per token): a sum of them divided by a number other than
            ``B`` or the token count is a count normaliser.
    """

    kind: str
    axis: int = 0
    per: int = 1
    power: int = 0
    why: str = ""
    relabel: bool = False
    tokens: bool = False


def unknown(op: str) -> Form:
    """The form of a result of ``op``, which the trace does not model."""
    return Form("unknown", why=op)


def coupled(why: str) -> Form:
    """The form of a result whose per-example weights depend on the batch."""
    return Form("coupled", why=why)


class Context:
    """What the forms of one checked step share: the batch and the step's hook."""

    __slots__ = ("__weakref__", "_defer", "_live", "_on_backward", "aliased", "batch", "handed",
                 "ops", "poisoned", "written")

    def __init__(self, batch: int, on_backward: Callable[[Tensor, Form], None],
                 defer: Callable[[Tensor, str], bool] | None = None,
                 live: Callable[[], bool] = lambda: True) -> None:
        self.batch = batch
        # The step's methods, held weakly: a traced value the user keeps (a history of
        # detached outputs) does not keep the step alive; a dead step's loss is done.
        self._on_backward = _weak(on_backward)
        # Whether the step's loss is still to come: until then a value computed from
        # the outputs without gradient (detached, under no_grad, an argmax) is traced
        # too, so one reduced over the batch is seen if it enters the loss.
        self._live = _weak(live)
        # A sync-free step takes a data-dependent verdict (a bool tensor that, if
        # true, makes the loss couple examples) to check before its sums are
        # delivered, instead of reading it now; returns False to have it read now.
        self._defer = None if defer is None else _weak(defer)
        self.handed: list[weakref.ref[Tensor]] = []  # the traced outputs, for retain_grad
        # Why the outputs themselves were changed across the examples through an alias
        # without gradient (m = o.detach(); m -= m.mean(0)); "" while they were not.
        self.poisoned = ""
        # The memory of traced tensors with gradient that were detached (o.detach(), o.data):
        # a write into the detached alias changes them too.
        self.aliased: list[weakref.ref[Tensor]] = []
        # Plain tensors written from the outputs with a batch statistic (now traced): a
        # plain tensor sharing their memory (z.data, a view taken before) holds it too.
        self.written: list[Tensor] = []  # (held: a `z.data` alias is dropped at once)
        _LATEST[:] = [weakref.ref(self)]
        # What was done to the outputs with gradient, each distinct op once in first-use
        # order: the loss's fingerprint (a new one is checked at once; see
        # GradClipper._record_outputs).
        self.ops: dict[tuple[str, tuple[int, ...]], None] = {}

    def on_backward(self, loss: Tensor, form: Form) -> None:
        """The step's check of a traced loss about to be backpropagated."""
        fn = self._on_backward()
        if fn is not None:
            fn(loss, form)

    @property
    def defer(self) -> Callable[[Tensor, str], bool] | None:
        """The step's deferral of a data-dependent verdict, or ``None`` (read it now)."""
        return None if self._defer is None else self._defer()

    def live(self) -> bool:
        """Whether the step's loss is still to be backpropagated."""
        fn = self._live()
        return fn is not None and bool(fn())

    def fingerprint(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The distinct operations on the traced tensors so far, each with its numbers' zero pattern."""
        return tuple(self.ops)

    def retained(self) -> list[tuple[Tensor, Tensor | None]]:
        """The handed-out outputs that retain their gradient, with its value now."""
        alive = (r() for r in self.handed)
        return [(t, t.grad) for t in alive if t is not None and t.retains_grad]


def _weak(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A reference to ``fn`` that does not keep a bound method's object alive."""
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return lambda: fn


class Traced(Tensor):
    """A model output (or a tensor computed from one) that records its :class:`Form`."""

    sdp_form: Form
    sdp_ctx: Context

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        from swiftdp.clipping import loss_writes as writes
        from swiftdp.clipping.loss_forms import propagate

        kwargs = kwargs or {}
        if func is _REGISTER_HOOK and args and isinstance(args[0], Traced):
            # A hook on an output (or a tensor computed from one) sits between the loss
            # and the layers: it may read the gradient, never change it (it could move
            # one example's loss into another's gradient).
            from swiftdp.clipping.hook_check import read_only_hook

            hook = args[1] if len(args) > 1 else kwargs["hook"]
            with torch._C.DisableTorchFunctionSubclass():
                return _REGISTER_HOOK(args[0], read_only_hook(
                    hook, "", where="on a model output (or a tensor computed from one)"))
        if func is Tensor.backward or func is torch.autograd.backward:
            roots = args[0] if args else kwargs.get("tensors", kwargs.get("self"))
            for root in pytree.tree_leaves(roots):
                if isinstance(root, Traced):
                    root.sdp_ctx.on_backward(root, root.sdp_form)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if _scaled_by_grad_scaler():
            raise InvalidArgumentError(_GRAD_SCALER)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if torch.compiler.is_compiling():
            return out
        leaves = pytree.tree_leaves((args, kwargs))
        ctxs = list({id(a.sdp_ctx): a.sdp_ctx for a in leaves if isinstance(a, Traced)}.values())
        if not ctxs:
            return out
        live_ctxs = [c for c in ctxs if c.live()]
        if _FORWARD[0] and not live_ctxs:
            _FORWARD[1] = True  # a finished step's value used inside the model's forward
        latest = None if live_ctxs else _latest_live()
        ctx = live_ctxs[0] if live_ctxs else latest or ctxs[0]
        live = bool(live_ctxs) or latest is not None
        # A traced value of a finished step (kept, e.g. detached) met while another step's
        # loss is pending: other examples' outputs, whatever op it goes through.
        carried = live and len(live_ctxs) < len(ctxs)
        name = getattr(func, "__name__", repr(func))
        if func is _SETITEM:
            writes.written(ctx, args, carried)
            return out
        grad = _grad_tensors(out)
        # A value without gradient is traced while the step's loss is still to come:
        # a batch statistic of the outputs taken detached (o.detach().mean(0), under
        # no_grad, an argmax count) makes every example's term depend on the others
        # when it enters the loss, and no derivative shows it. Afterwards it stays traced
        # as a value carried from a finished step (a queue of past outputs, a hidden
        # state): refused if it enters a later step's loss or the model's forward.
        if not grad and (not _tensors(out) or name in _FRESH):
            return out
        if not grad and not live:
            carried_form = coupled(_CARRIED)
            return pytree.tree_map(lambda t: _tag(t, carried_form, ctx, every=True), out)
        first = args[0] if args else None
        if live and isinstance(first, Traced) and first.requires_grad and isinstance(
                out, Tensor) and out is not first and writes.storage(out) == writes.storage(first):
            ctx.aliased.append(weakref.ref(first))  # detach, .data, a view (under no_grad too)
        if grad:
            # Each distinct (op, zeros) once, in first-use order: a per-example loop's
            # fingerprint does not grow with B (a new batch size is not a new loss).
            ctx.ops.setdefault((name, _zeros(leaves)), None)
        if live and ctx.written:
            writes.shared_with_written(ctx, leaves)
        try:
            with torch._C.DisableTorchFunctionSubclass():
                form = propagate(func, args, kwargs, out, ctx.batch, ctx)
        except Exception:  # never let the bookkeeping break the user's code
            form = unknown(name)
        if carried:
            form = coupled(_CARRIED)
        if live:
            written = (pytree.tree_leaves(first) if first is not None and out is first else []) + (
                pytree.tree_leaves(kwargs.get("out")))
            if name in _RUNNING_STATS and kwargs.get("training", len(args) > 5 and args[5]):
                written += [a for a in args[1:3] if isinstance(a, Tensor)]  # running stats
            held = form if name not in _RUNNING_STATS else unknown(name)
            for t in written:
                if isinstance(t, Tensor):
                    try:
                        writes.wrote(ctx, t, held, name)
                    except Exception:  # never let the bookkeeping break the user's code
                        pass
        return pytree.tree_map(lambda t: _tag(t, form, ctx, every=live), out)

    def __reduce_ex__(self, proto: Any) -> Any:
        # pickled (torch.save, multiprocessing) as the plain tensor it holds
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor).__reduce_ex__(proto)

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return copy.deepcopy(self.as_subclass(Tensor), memo)

    def __format__(self, spec: str) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return Tensor.__format__(self.as_subclass(Tensor), spec)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        with torch._C.DisableTorchFunctionSubclass():
            return Tensor.__repr__(self.as_subclass(Tensor))


_REGISTER_HOOK = Tensor.register_hook
_CARRIED = ("a value computed from an earlier step's outputs (kept, e.g. detached, from "
            "another forward: other examples under Poisson sampling) enters this step's loss")
_CARRIED_FORWARD = (
    "the model's forward used a value computed from an earlier step's outputs (a hidden state "
    "or a statistic kept across batches, a module buffer written from them): other examples' "
    "data under Poisson sampling; start each batch's state afresh")
_LATEST: list[weakref.ref[Context]] = []  # the most recent step's trace context
# ops that update their running-statistic arguments in place (training=True)
_RUNNING_STATS = frozenset({"batch_norm", "instance_norm"})


_FORWARD = [False, False]  # in the private model's forward; a finished step's value used in it


def forward_begins() -> None:
    """The engine's root forward starts: watch for values kept from a finished step."""
    _FORWARD[:] = [True, False]


def forward_ends() -> bool:
    """The root forward ended: whether it used a traced value of a finished step (a hidden
    state or a statistic kept from an earlier step's outputs: other examples' data)."""
    used = _FORWARD[1]
    _FORWARD[:] = [False, False]
    return used


def _latest_live() -> Context | None:
    """The trace context of the step whose loss is pending, if any."""
    c = _LATEST[0]() if _LATEST else None
    return c if c is not None and c.live() else None


_SETITEM = Tensor.__setitem__


# New tensors whose values do not come from their operand's (its shape, dtype and device only)
_FRESH = frozenset({"zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                    "randn_like", "randint_like", "new_zeros", "new_ones", "new_full",
                    "new_empty", "new_tensor"})


def _zeros(leaves: list[Any]) -> tuple[int, ...]:
    """Which plain numbers among an operation's arguments (``leaves``) are zero (1) or not (0).

    A term weighted ``0.0`` on the checked steps and switched on later (a
    regulariser's weight) changes the fingerprint; a weight that moves among
    non-zero values does not, so an annealed weight is not re-checked at
    every step.
    """
    return tuple(int(a == 0) for a in leaves
                 if isinstance(a, int | float) and not isinstance(a, bool))


def trace_outputs(output: Any, batch: int, batch_dim: int, ctx: Context,
                  axis_of: Callable[[Tensor], int | None] = lambda t: None,
                  carried: bool = False) -> Any:
    """The outputs as :class:`Traced` tensors, each with its batch axis (or ``unknown``).

    ``axis_of`` gives the batch dimension the engine tracked to an output
    (``None`` if untracked); otherwise dimension ``batch_dim`` (0 for 1-D and
    2-D outputs) is taken when its size is the batch size, or the only
    dimension of that size (this reading serves the loss check only; the
    second-derivative check and the independence probe do not rely on it). An output already
    traced (computed from a traced input: a submodule called from outside the
    model) is a model output again, with a fresh form.
    """
    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.requires_grad:
            return t
        d = axis_of(t)
        if d is None:  # untracked (e.g. an RNN's final state): where the batch size is
            d = batch_dim if t.dim() > max(batch_dim, 1) else 0
            sized = [k for k, n in enumerate(t.shape) if n == batch]
            if t.dim() > d and t.shape[d] != batch and len(sized) == 1:
                d = sized[0]
        rows = t.dim() > d and t.shape[d] == batch
        form = coupled(_CARRIED_FORWARD) if carried else Form("rows", axis=d) if rows else (
            unknown("a model output without the batch dimension"))
        out = _tag(t, form, ctx)
        ctx.handed.append(weakref.ref(out))
        return out
    return map_outputs(wrap, output)


def plain_views(output: Any) -> tuple[Any, list[Tensor]]:
    """Plain-tensor views of the outputs that require grad, and those outputs, in one pass.

    The views are what a step hands the user (``autograd.grad`` on them stops
    there); the originals are what the engine records.
    """
    originals: list[Tensor] = []

    def view(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.requires_grad:
            return t
        originals.append(t)
        with torch._C.DisableTorchFunctionSubclass():
            v = t.view_as(t)
        return v.as_subclass(Tensor) if isinstance(v, Traced) else v
    return map_outputs(view, output), originals


def map_outputs(fn: Callable[[Any], Any], output: Any) -> Any:
    """``output`` with ``fn`` applied to each leaf (pytree containers, dataclasses, mappings)."""
    leaves, spec = pytree.tree_flatten(output)
    if len(leaves) == 1 and leaves[0] is output and not isinstance(output, Tensor):
        # a container pytree does not know (a dataclass, an unregistered dict subclass)
        if is_dataclass(output) and not isinstance(output, type):
            return dc_replace(output, **{f.name: map_outputs(fn, getattr(output, f.name))
                                         for f in fields(output) if f.init})
        if isinstance(output, Mapping):
            try:
                new = copy.copy(output)
                for k, v in output.items():
                    new[k] = map_outputs(fn, v)  # type: ignore[index]
                return new
            except Exception:
                return output  # a mapping we cannot rebuild: handed back untouched
        return fn(output)
    return pytree.tree_unflatten(
        [fn(x) if isinstance(x, Tensor) else map_outputs(fn, x) for x in leaves], spec)


def form_of(t: Any) -> Form | None:
    """The recorded form of ``t``, or ``None`` for a plain tensor."""
    return t.sdp_form if isinstance(t, Traced) else None


def verdict(form: Form, reduction: str, batch: int, *, scalar: bool = True) -> str | None:
    """Why a loss of this form cannot be clipped as ``reduction``, or ``None``.

    Args:
        form: the loss's form.
        reduction: the declared ``loss_reduction``.
        batch: ``B``.
        scalar: a scalar loss (``loss.backward()``); ``False`` for the
            per-example vector of ``dp.backward(losses)``, where only
            ``coupled`` forms are refused (the vector is checked row by row).
    """
    if form.kind == "coupled":
        return f"The loss couples the examples of the batch: {form.why}. {_FIX}"
    if batch < 2:
        return None
    if not scalar:
        if form.kind == "rows" and form.power:
            return (f"The per-example losses are scaled by B**{form.power} (B = {batch}): "
                    "each example's loss must not depend on the batch size, which one "
                    f"example's presence changes. {_FIX}")
        return None
    if form.kind == "unknown":
        return (f"swiftdp cannot read how this loss combines the examples of the batch: it "
                f"is formed through `{form.why}`, which the loss check does not model, so it "
                f"cannot rule out per-example weights that depend on other examples. {_FIX}")
    if form.kind != "total":
        return ("backward() of a non-scalar loss on a checked step: its gradient argument "
                f"weights the examples in a way the check cannot read. {_FIX}")
    want = -1 if reduction == "mean" else 0
    if form.power == want:
        return None
    found = {0: "sums its examples' terms", -1: "averages its examples' terms"}.get(
        form.power, f"weights each example's term by B**{form.power} (B = {batch}, e.g. "
        "a mean multiplied by the batch size)")
    return (f"The loss {found}, but loss_reduction={reduction!r} was declared. swiftdp "
            "rescales each example's gradient by the declared reduction before clipping, "
            "so a mismatch weights every example by the batch size — which one example's "
            f"presence changes. (A Python number equal to B = {batch} is read as the batch "
            f"size.) {_FIX}")


_SCALER_FILE = _grad_scaler.__file__
_GRAD_SCALER = (
    "The loss is scaled by a torch.amp.GradScaler (scaler.scale(loss)), which swiftdp does "
    "not support: each example's gradient would be clipped with the loss scale in it (an "
    "effective threshold of C / scale once unscaled), and the scaler's unscale_, inf check "
    "and step skipping would read the clipped sums before any noise is added (and find no "
    "gradient under make_private, which keeps them private until optimizer.step()). Call "
    "loss.backward() and optimizer.step() without the scaler: bf16 autocast "
    "(torch.autocast(device, dtype=torch.bfloat16)) needs no loss scaling, and swiftdp "
    "computes norms, clip factors and clipped sums in float32 or wider under autocast.")


def _scaled_by_grad_scaler() -> bool:
    """Whether the op being traced is ``GradScaler.scale`` multiplying a loss by its scale."""
    code = sys._getframe(2).f_code  # the op's call site (the caller of __torch_function__)
    return code.co_filename == _SCALER_FILE and code.co_name in ("scale", "apply_scale")


def _tag(t: Any, form: Form, ctx: Context, *, every: bool = False) -> Any:
    """``t`` as a :class:`Traced` tensor of ``form``; ``every``: whatever its dtype and grad.

    Outputs are tagged when they are floating point and require grad; what is
    computed from them while the step's loss is still to come is tagged
    whatever it is (an argmax's indices, a detached mean, a mask).
    """
    if not isinstance(t, Tensor) or not (every or (t.requires_grad and t.is_floating_point())):
        return t
    with torch._C.DisableTorchFunctionSubclass():
        out = t.as_subclass(Traced) if not isinstance(t, Traced) else t
    out.sdp_form, out.sdp_ctx = form, ctx
    return out


def _grad_tensors(out: Any) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(out))


def _tensors(out: Any) -> bool:
    return any(isinstance(t, Tensor) for t in pytree.tree_leaves(out))
