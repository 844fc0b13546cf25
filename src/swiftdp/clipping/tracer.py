"""Capture of every use of every trainable parameter during the forward pass.

The :class:`Tracer` is a ``TorchFunctionMode`` active during the model's
forward. Each torch function that receives a trainable parameter is routed:

1. to its layer rule (``swiftdp.layers``), which computes the output with the
   parameter detached and captures the inputs and output gradient;
2. else, when the parameter is broadcast over the batch by an elementwise op
   (a learned scale, a position embedding), to the *expand* rule: the
   parameter is replaced by a leaf expanded along the batch dimension, whose
   gradient is exactly the per-example gradient;
3. else to the *generic* rule: the innermost running module that contains the
   parameter is recomputed per example with ``torch.func`` (slower, exact).

The parameter is detached wherever it is used, so ``param.grad`` is written
by the engine alone; a use that does not pass through here (a custom
``autograd.Function``, code outside the forward) would accumulate a gradient
into the parameter, and the escape guard (:mod:`.escapes`) refuses it. The
tracer's per-forward state (batch token, parameter slices, captures) is the
step's (:mod:`.step`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrize import ParametrizationList
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from swiftdp.clipping import batchdim, expand, shared
from swiftdp.clipping.args import SETITEM, detach_in, flat, mutates, slice_region
from swiftdp.clipping.capture import Capture, ModuleCall, Source
from swiftdp.clipping.contract import Build, Decline, Site, Unbatched
from swiftdp.clipping.hook_check import read_only_hook
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers import RULES

if TYPE_CHECKING:
    from swiftdp.clipping.engine import GradClipper
    from swiftdp.clipping.step import ForwardToken, Step

__all__ = ["Capture", "ModuleCall", "Tracer"]

Builder = Build

# Functions that read metadata or cut the graph; a parameter passing through
# them carries no gradient.
_PASSTHROUGH_GETTERS = {"data", "grad", "_grad", "shape", "dtype", "device", "requires_grad"}
_PASSTHROUGH_FUNCS = {Tensor.detach, torch.detach, Tensor.size, Tensor.dim, Tensor.numel}

# Elementwise functions whose parameter arguments may be expanded along the
# batch dimension without changing the result.
_BROADCAST_FUNCS: set[Any] = {
    torch.add, torch.sub, torch.mul, torch.div, torch.addcmul, torch.where,
    Tensor.add, Tensor.sub, Tensor.mul, Tensor.div,
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__,
    Tensor.__mul__, Tensor.__rmul__, Tensor.__truediv__, Tensor.__rtruediv__,
    Tensor.expand, Tensor.expand_as,
}


RECURRENT = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
_REGISTER_HOOK = Tensor.register_hook

# Layers acting on each row of their input alone: on a batch merged into the
# rows (OPT's ``(B * T, d)``), run as ``(B, T, d)``.
# (function: position of the batched input)
_UNMERGE: dict[Any, int] = {F.linear: 0, F.layer_norm: 0, F.embedding: 0, F.rms_norm: 0,
                            torch.addmm: 1}
# Layers acting on each row of an ``(N, C, *spatial)`` input alone, which cannot
# take an extra dimension: on a merged batch (the K views of augmentation
# multiplicity, ``(B * K, C, H, W)``) each row is one entry and the rows'
# per-entry gradients are summed per example (see :meth:`Tracer._row_grouped`).
_ROW_GROUPED = frozenset({torch.conv1d, torch.conv2d, torch.conv3d, F.group_norm,
                          F.instance_norm})


class Tracer(TorchFunctionMode):
    """The torch-function mode that routes parameter uses to layer rules."""

    def __init__(self, engine: GradClipper) -> None:
        super().__init__()
        self.engine = engine
        self.anchor = torch.zeros((), requires_grad=True)
        self.stack: list[ModuleCall] = []
        self._ids = itertools.count()
        # The step of the forward in progress, and the forward's token:
        # tensors marked with it carry the batch.
        self.step: Step | None = None
        self.batch_token: object = object()
        self.trainable: dict[int, Tensor] = {}
        self._saved: list[tuple[Any, ...]] = []
        # Whether the op a rule is running for has a batched input (the
        # tensors a composite rule derives from it inside are not marked).
        self.rule_batched = False
        self._site: Site | None = None  # the routed call's context, built on first use
        # Entries per example of the rows a row-grouped rule is running on (1: none).
        self._rows = 1
        self._root_sites: dict[bool, Site] = {}  # the sites of calls outside any module
        # Detached slices of trainable parameters (``self.pos[:, :t]``):
        # id -> (view, parameter, region); the step's, reset at every forward.
        self.views: dict[int, tuple[Tensor, Tensor, tuple[slice, ...]]] = {}
        # Computations from parameters without the batch (see :mod:`.shared`).
        self.shared = shared.SharedState()

    def begin(self, step: Step, token: ForwardToken) -> None:
        """Route the forward that ``step`` just began, its batch marked with ``token``."""
        self.step, self.batch_token = step, token
        self.trainable, self.views = step.trainable, step.views
        self._root_sites = {}
        self.shared = shared.SharedState()

    def begin_recompute(self, step: Step, token: ForwardToken | None, kind: str,
                        stack: list[ModuleCall] | None = None) -> None:
        """Route a checkpoint's recomputation for ``step`` (see :mod:`.recompute`).

        ``stack``: the module calls that enclosed the first run (a replay
        routes exactly as the first run did).
        """
        self._saved.append((self.step, self.batch_token, self.trainable, self.views,
                            self.stack, step.captures, step.recompute))
        self.step, self.batch_token = step, (token if token is not None
                                             else step.token or object())
        self.trainable, self.views = step.trainable, step.views
        self.stack = list(stack) if stack else []
        step.captures, step.recompute = [], kind

    def snapshot_stack(self) -> list[ModuleCall]:
        """The module calls in progress, as they are now (for a later replay)."""
        return [ModuleCall(c.module, c.path, c.call_id, c.args, c.kwargs, dict(c.generic))
                for c in self.stack]

    def end_recompute(self) -> None:
        """The recomputation returned: back to the state before it."""
        step = self.step
        (self.step, self.batch_token, self.trainable, self.views, self.stack,
         captures, kind) = self._saved.pop()
        if step is not None:
            step.captures, step.recompute = captures, kind

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if self.engine.is_suspended:
            return func(*args, **kwargs)
        if func is _REGISTER_HOOK and args and isinstance(args[0], Tensor) and batchdim.read(
                args[0], self.batch_token)[0]:
            hook = args[1] if len(args) > 1 else kwargs["hook"]
            return func(args[0], read_only_hook(hook, self.module_path()))
        found, src, meets = self.scan(args, kwargs)
        if meets and torch.is_grad_enabled():
            if src is None:  # still without the batch: on the parameters' aliases
                out = None if found else shared.to_batch(self, func, args, kwargs, meets)
                return out if out is not None else shared.run_shared(
                    self, func, args, kwargs, found, meets)
            args, kwargs = shared.meet(self, func, args, kwargs, meets, src)
            found, src, _ = self.scan(args, kwargs)
        if not torch.is_grad_enabled():  # no gradient: only the batch tracking goes on
            step = self.step
            if found and step is not None and step.recompute is None:
                # Counted all the same: a reentrant checkpoint recomputes this
                # use later, with gradients (ghost mode must know it is reused).
                for p in found:
                    step.count_use(id(self.base_param(p)))
            out = func(*args, **kwargs)
            if src is not None:
                self._mark_outputs(func, args, kwargs, out, src)
            return out
        if found:
            prev, self.rule_batched = self.rule_batched, src is not None
            prev_site, self._site = self._site, None
            try:
                out = self.call_with_params(func, args, kwargs, found)
            finally:
                self.rule_batched, self._site = prev, prev_site
        else:
            out = func(*args, **kwargs)
        if src is not None:
            self._mark_outputs(func, args, kwargs, out, src)
        return out

    # ----------------------------------------------------- batch tracking
    def mark_batched(self, t: Tensor, dim: int | None, kind: int = batchdim.REAL,
                     per: int = 1) -> None:
        """Record that ``t`` carries the batch along ``dim`` (a model input, or derived)."""
        batchdim.mark(t, self.batch_token, dim, kind, per)

    def _mark_outputs(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      out: Any, src: tuple[Tensor, int | None]) -> None:
        x, d = src[0], src[1]
        outs = [out] if isinstance(out, Tensor) else (
            [t for t in flat(out) if isinstance(t, Tensor)] if isinstance(out, (list, tuple))
            else [])
        virtual = batchdim.REAL
        if len(src) > 2:  # an operand's rows were broadcast to the batch: they must stay aligned
            token = self.batch_token
            operands = []
            for t in flat((args, kwargs)):
                if isinstance(t, Tensor):
                    m = getattr(t, batchdim.ATTR, None)
                    if m is not None and m[0] is token:
                        operands.append((t, m[1], m[2], m[3]))
            virtual = batchdim.check_virtual(func, args, kwargs, operands, outs,
                                             self.batch_size)
        fname = getattr(func, "__name__", "")
        if fname == "multi_head_attention_forward" and len(outs) == 2:
            # (output, weights): the weights are (B, ...) whatever the query's layout;
            # by position, since their shape can equal the output's.
            self.mark_batched(outs[0], d, virtual)
            self.mark_batched(outs[1], 0, virtual)
            outs = []
        elif fname in RECURRENT and len(outs) > 1:
            # (output, h_n[, c_n]): the final states are (layers * directions, B, H)
            for h in outs[1:]:
                self.mark_batched(h, 1 if h.dim() == 3 else None, virtual)
            outs = outs[:1]
        m = getattr(x, batchdim.ATTR, None)
        per = m[3] if m is not None and len(m) > 3 else 1
        for t in outs:
            if fname in batchdim.RESHAPES and d is not None:
                dim, p = batchdim.reshaped(x, d, per, t, self.batch_size)
                self.mark_batched(t, dim, virtual, p)
                continue
            dim = batchdim.out_dim(func, args, kwargs, x, d, t)
            if per != 1 and dim is not None and (dim != d or t.shape[dim] != x.shape[d]):
                dim = None  # a merged batch whose dimension changed: lost
            self.mark_batched(t, dim, virtual, per)
        # An in-place op writes batched values into its first argument.
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.startswith("__")) or name in SETITEM:
            if args and isinstance(args[0], Tensor) and args[0] is not x:
                self.mark_batched(args[0], None if not outs or outs[0] is not args[0]
                                  else batchdim.read(args[0], self.batch_token)[1],
                                  batchdim.TAINTED if virtual else batchdim.REAL)
        o = kwargs.get("out")
        if isinstance(o, Tensor) and not any(o is t for t in outs):
            self.mark_batched(o, None, batchdim.TAINTED if virtual else batchdim.REAL)

    def base_param(self, t: Tensor) -> Tensor:
        """The parameter behind ``t`` (itself, or the parameter a recorded slice views)."""
        v = self.views.get(id(t))
        return v[1] if v is not None and v[0] is t else t

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``func`` as if called under the tracer (for composite rules)."""
        found = self.find_params(args, kwargs)
        if not found or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        return self.call_with_params(func, args, kwargs, found)

    def call_with_params(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        found: list[Tensor],
    ) -> Any:
        generic_here = [p for p in found if self.generic_call_for(self.base_param(p)) is not None]
        if generic_here:
            if len(generic_here) < len(found):
                # Mixed with parameters no generic call owns yet: the whole op
                # goes generic, so nothing of it keeps an autograd edge or is
                # left out of the recomputation.
                return self._mark_generic(func, args, kwargs, found)
            return func(*detach_in(args, generic_here), **detach_in(kwargs, generic_here))
        if self.stack and isinstance(self.stack[-1].module, ParametrizationList):
            # A parametrization computing a weight from its underlying
            # parameters: the parametrized module is recomputed per example.
            return self._mark_generic(func, args, kwargs, found)
        if self.views and any(id(p) in self.views for p in found):
            return self.unknown(func, args, kwargs, found)  # slices: expand or generic only
        rule = RULES.get(func)
        if rule is not None:
            pos = _UNMERGE.get(func)
            if pos is not None and len(args) > pos and isinstance(args[pos], Tensor):
                m = batchdim.merged(args[pos], self.batch_token)
                if m is not None and m[0] == 0 == self.batch_dim:
                    return self._unmerged(rule, func, args, kwargs, m[1], pos)
            if func in _ROW_GROUPED:
                x = args[0] if args else kwargs.get("input")
                m = batchdim.merged(x, self.batch_token)
                if m is not None and m[0] == 0:
                    return self._row_grouped(rule, func, args, kwargs, m[1])
            try:
                return rule(self, func, args, kwargs)
            except Decline:
                pass
            except Unbatched:
                if self.rule_batched:
                    raise
                # No operand carries the batch: credited where the result meets it.
                return shared.run_shared(self, func, args, kwargs, found, [])
        return self.unknown(func, args, kwargs, found)

    def _unmerged(self, rule: Any, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], per: int, pos: int) -> Any:
        """A row-wise layer on a merged batch ``(B * per, ...)``: run as ``(B, per, ...)``."""
        x, B = args[pos], self.batch_size
        m = getattr(x, batchdim.ATTR)
        x2 = x.view(B, per, *x.shape[1:]) if x.is_contiguous() else x.reshape(
            B, per, *x.shape[1:])
        self.mark_batched(x2, 0, m[2])
        self._site = None
        try:
            out = rule(self, func, (*args[:pos], x2, *args[pos + 1:]), kwargs)
        except Decline:
            return self.unknown(func, args, kwargs, self.find_params(args, kwargs))
        return out.reshape(B * per, *out.shape[2:])

    def _row_grouped(self, rule: Any, func: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any], per: int) -> Any:
        """A per-row layer on a merged batch ``(B * per, ...)``: rows clipped with their example.

        The rule runs on the ``B * per`` rows as if each were an example (its
        :class:`Site` says so), and :meth:`track` sums each example's ``per``
        consecutive rows of every contribution it builds
        (:meth:`~swiftdp.clipping.contributions.Contribution.merge_rows`): the
        clipped unit stays the example, whatever its rows are (the K
        augmented views of one image, a Swin's windows).
        """
        prev, self._rows, self._site = self._rows, per, None
        try:
            return rule(self, func, args, kwargs)
        except Decline:
            self._rows, self._site = prev, None
            return self.unknown(func, args, kwargs, self.find_params(args, kwargs))
        finally:
            self._rows, self._site = prev, None

    def find_params(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
        """Trainable parameters and recorded parameter slices anywhere in the arguments."""
        return self.scan(args, kwargs)[0]

    def scan(self, args: Sequence[Any], kwargs: dict[str, Any]
             ) -> tuple[list[Tensor], tuple[Tensor, int | None] | None, list[Tensor]]:
        """The one argument walk of the engine, at any nesting depth.

        Positional and keyword arguments, nested lists, tuples and dicts.

        Returns:
            ``(params, src, shared)``: the trainable parameters and recorded
            parameter slices found, the first argument carrying the batch with
            its batch dimension (``None`` when no argument carries it), and the
            arguments computed from parameters without the batch
            (:mod:`.shared`).
        """
        # No nested function: a closure that calls itself is a reference cycle
        # holding the found tensors (activations) until the cyclic gc runs, once
        # per routed op. Top-level tensors inline, containers by _scan_into.
        trainable, views, token = self.trainable, self.views, self.batch_token
        out: list[Tensor] = []
        state: list[Any] = [None, False, []]  # first batched argument, any virtual, shared
        for seq in (args, kwargs.values()) if kwargs else (args,):
            for x in seq:
                if isinstance(x, Tensor):
                    i = id(x)
                    if (i in trainable and trainable[i] is x) or (i in views and views[i][0] is x):
                        if not any(x is o for o in out):
                            out.append(x)
                        continue
                    m = getattr(x, batchdim.ATTR, None)
                    if m is not None and m[0] is token:
                        if state[0] is None:
                            state[0] = (x, m[1])
                        if m[2]:
                            state[1] = True
                    elif getattr(x, shared.ATTR, None) is not None and shared.read(x, token):
                        state[2].append(x)
                elif isinstance(x, (list, tuple, dict)):
                    _scan_into(x, trainable, views, token, out, state)
        batched: tuple[Tensor, int | None] | None = state[0]
        if state[1] and batched is not None:
            batched = (batched[0], batched[1], True)  # type: ignore[assignment]
        return out, batched, state[2]

    # ------------------------------------------------------ the Recorder
    @property
    def site(self) -> Site:
        """The context of the call being routed (the :class:`Recorder` contract).

        One :class:`Site` per module call and batched flag, reused by the calls
        it routes (its fields are those of the module call and of the forward).
        """
        if self._site is not None:
            return self._site
        eng, top = self.engine, (self.stack[-1] if self.stack else None)
        cache: dict[bool, Site] = (top.sites if top is not None else self._root_sites
                                   ) if self._rows == 1 else {}  # row-grouped: not cached
        site = cache.get(self.rule_batched)
        size = self.batch_size * self._rows
        if (site is None or site.batch_token is not self.batch_token
                or site.trainable is not self.trainable or site.batch_size != size):
            site = Site(
                batch_size=size,
                batch_dim=0 if eng.batch_first else 1,
                batch_first=eng.batch_first,
                module_path=top.path if top is not None else "<model>",
                module=top.module if top is not None else None,
                module_args=top.args if top is not None else (),
                module_kwargs=top.kwargs if top is not None else {},
                trainable=self.trainable,
                batch_token=self.batch_token,
                call_batched=self.rule_batched,
            )
            cache[self.rule_batched] = site
        self._site = site
        return site

    @property
    def batch_dim(self) -> int:
        """Batch dimension of sequence-shaped activations (0 or 1)."""
        return 0 if self.engine.batch_first else 1

    @property
    def batch_size(self) -> int:
        """Batch size of the forward in progress."""
        return self.step.batch_size if self.step is not None else 0

    def module_path(self) -> str:
        """Path of the innermost running module (for error messages)."""
        return self.stack[-1].path if self.stack else "<model>"

    def param_name(self, p: Tensor) -> str:
        """Qualified name of a trainable parameter."""
        return self.engine.param_names().get(id(p), "<unnamed parameter>")

    def track(
        self,
        compute: Callable[[], Any],
        inputs: Sequence[Any],
        params: Sequence[Tensor | None],
        build: Builder,
    ) -> Any:
        """Compute an op's output and capture its output gradients for ``build``.

        Args:
            compute: computes the output (tensor or tuple of tensors) with the
                parameters detached.
            inputs: the op's non-parameter tensor inputs; when none requires
                grad the output is made to require grad through a source node.
            params: the trainable parameters this use contributes to.
            build: turns the list of output gradients (``None`` for an output
                that received none) into contributions.

        Returns:
            What ``compute`` returned.
        """
        needs = any(isinstance(t, Tensor) and t.requires_grad for t in flat(inputs))
        out = compute() if needs else Source.apply(self.anchor, compute)
        outs = [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)]
        real_params = [p for p in params if p is not None]
        if self._rows > 1:
            build = _summed_rows(build, self._rows, self.site.module_path)
        cap = Capture(self, len(outs), build, real_params, tuple(c.call_id for c in self.stack))
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(cap.hook(i))
        return out

    def broadcast_batch(self, t: Tensor, dim: int) -> None:
        """See :meth:`swiftdp.clipping.contract.Recorder.broadcast_batch`."""
        self.mark_batched(t, dim, batchdim.VIRTUAL)

    # ----------------------------------------------------------- fallbacks
    def generic_call_for(self, p: Tensor) -> ModuleCall | None:
        for c in reversed(self.stack):
            if id(p) in c.generic:
                return c
        return None

    def unknown(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        found: list[Tensor],
    ) -> Any:
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if func in _PASSTHROUGH_FUNCS or (
            name == "__get__" and getattr(owner, "__name__", "") in _PASSTHROUGH_GETTERS
        ):
            return func(*args, **kwargs)
        if (func is Tensor.__getitem__ and len(found) == 1 and args and args[0] is found[0]
                and not self.rule_batched and shared.table_lookup(args) is not None):
            # table[idx] with indices that carry no batch (Swin's relative position
            # bias): a lookup without the batch, credited where its rows meet it.
            return shared.run_shared(self, func, args, kwargs, found, [])
        if func is Tensor.__getitem__ and len(found) == 1 and args and args[0] is found[0]:
            p = found[0]
            region = slice_region(args[1] if len(args) > 1 else None, p.shape)
            if region is not None and id(p) in self.trainable:
                out = p.detach()[args[1]]
                self.views[id(out)] = (out, p, region)
                return out
        if mutates(func, kwargs):
            # Running it to inspect the result would apply it twice.
            return self._mark_generic(func, args, kwargs, found)
        with torch.no_grad():
            ref = func(*args, **kwargs)
        if not any(isinstance(t, Tensor) for t in pytree.tree_leaves(ref)):
            return ref
        if func in _BROADCAST_FUNCS and isinstance(ref, Tensor):
            out = expand.expand_rule(self, func, args, kwargs, found, ref)
            if out is not None:
                return out
        return self._mark_generic(func, args, kwargs, found)

    def _mark_generic(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        found: list[Tensor],
    ) -> Any:
        for p in [self.base_param(q) for q in found]:
            owner = None
            for c in reversed(self.stack):
                if isinstance(c.module, ParametrizationList):
                    continue
                if any(q is p for q in c.module.parameters()):
                    owner = c
                    break
            if owner is None:
                raise UnsupportedModuleError(
                    f"Parameter `{self.param_name(p)}` is used by "
                    f"`{getattr(func, '__name__', func)}` outside any module that owns it, so "
                    "swiftdp cannot clip it exactly. Use the parameter inside the module that "
                    "registers it, or freeze it with requires_grad_(False)."
                )
            owner.generic[id(p)] = p
        return func(*detach_in(args, found), **detach_in(kwargs, found))


def _scan_into(x: Any, trainable: dict[int, Tensor], views: dict[int, Any], token: object,
               out: list[Tensor], state: list[Any]) -> None:
    """The nested part of :meth:`Tracer.scan` (lists, tuples, dicts at any depth)."""
    if isinstance(x, Tensor):
        i = id(x)
        if (i in trainable and trainable[i] is x) or (i in views and views[i][0] is x):
            if not any(x is o for o in out):
                out.append(x)
        else:
            m = getattr(x, batchdim.ATTR, None)
            if m is not None and m[0] is token:
                if state[0] is None:
                    state[0] = (x, m[1])
                if m[2]:
                    state[1] = True
            elif getattr(x, shared.ATTR, None) is not None and shared.read(x, token):
                state[2].append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _scan_into(y, trainable, views, token, out, state)
    elif isinstance(x, dict):
        for y in x.values():
            _scan_into(y, trainable, views, token, out, state)


def _summed_rows(build: Builder, per: int, path: str) -> Builder:
    """``build`` with each contribution's ``per`` consecutive rows summed per example."""

    def summed(grads: Sequence[Tensor | None], policy: Any) -> list[Any]:
        out = []
        for c in build(grads, policy):
            merged = c.merge_rows(per)
            if merged is None:
                raise UnsupportedModuleError(
                    f"In module `{path}`, a {type(c).__name__} use of parameter of shape "
                    f"{tuple(c.param.shape)} is on a batch merged with {per} rows per example "
                    "(augmentation multiplicity's views), which this kind of contribution "
                    "cannot sum per example. Keep the views on a dimension of their own "
                    "through this layer, or use mode='nanobatch'."
                )
            out.append(merged)
        return out

    return summed
