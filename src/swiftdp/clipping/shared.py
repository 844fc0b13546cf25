"""Values computed from parameters without the batch, and where they meet it.

T5's relative position bias is a lookup of a ``(T, T)`` bucket table, with no
batch dimension, added to every example's attention scores. Its table's
gradient, read where it is computed, is the whole batch's: it cannot be
clipped per example there. So such a computation is run apart:

1. A parameter use with no operand that carries the batch (a layer rule
   refusing it with :class:`~swiftdp.clipping.contract.Unbatched`), and every
   later op on its result that still meets no batched operand, runs on
   *aliases* of the parameters (detached leaves): a small graph of its own,
   the value marked *shared* with the parameters it depends on.
2. Where a shared value meets a batched operand in a broadcasting op (``+``,
   ``*``, ``where``, ``matmul`` over its broadcast dimensions), it is replaced
   by a copy expanded along the batch, marked as a virtual batch (its rows
   must stay aligned with the examples, :func:`.batchdim.check_virtual`).
   That copy's gradient is one row per example; pulled back through the
   shared graph with a batched vector-Jacobian product, it gives every
   parameter's per-example gradient.

A shared value that reaches the loss without meeting the batch would give
the parameters the whole batch's gradient: the aliases' hooks refuse it.
The batch is never read from a size here either: a shared value whose own
dimension sits where the batch is would be taken for batched, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swiftdp.clipping import batchdim
from swiftdp.clipping.args import flat, replace_in
from swiftdp.clipping.contract import Build, Policy
from swiftdp.clipping.contributions import Contribution, PerSampleGrads
from swiftdp.errors import UnsupportedModuleError

if TYPE_CHECKING:
    from swiftdp.clipping.tracer import Tracer

ATTR = "_swiftdp_shared"

# Ops in which a shared operand may be expanded along the batch without
# changing the result (they broadcast it).
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "where", "maximum", "minimum", "masked_fill",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
    "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "add_", "sub_", "mul_", "div_",
})
_MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__"})


class SharedState:
    """The shared computations of one forward: the parameters' aliases."""

    def __init__(self) -> None:
        self.aliases: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, alias)
        self.pulling = 0  # inside a batched pull-back (the aliases' hooks stay quiet)

    def alias(self, tr: Tracer, p: Tensor) -> Tensor:
        got = self.aliases.get(id(p))
        if got is not None and got[0] is p:
            return got[1]
        a = p.detach().requires_grad_()
        name = tr.param_name(p)
        a.register_hook(self._refuse_unmet(name))
        self.aliases[id(p)] = (p, a)
        return a

    def _refuse_unmet(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.pulling:
                return
            raise UnsupportedModuleError(
                f"Parameter `{name}` was used without the batch (no operand of its use derives "
                "from the model's batched inputs), and the value computed from it reached the "
                "loss without being combined with the batch: its gradient is the whole batch's "
                "and cannot be clipped per example. Combine it with batched activations inside "
                "the model (as a position bias is added to the attention scores), or freeze it."
            )

        return hook


def read(t: Any, token: object) -> tuple[tuple[Tensor, Tensor], ...] | None:
    """The ``(parameter, alias)`` pairs a shared value depends on (``None``: not shared)."""
    m = getattr(t, ATTR, None)
    if m is None or m[0] is not token:
        return None
    pairs: tuple[tuple[Tensor, Tensor], ...] = m[1]
    return pairs


def _mark(out: Any, token: object, pairs: tuple[tuple[Tensor, Tensor], ...]) -> None:
    for t in flat(out) if isinstance(out, (list, tuple)) else [out]:
        if isinstance(t, Tensor) and t.requires_grad:
            try:
                setattr(t, ATTR, (token, pairs))
            except (AttributeError, RuntimeError):
                pass


def run_shared(tr: Tracer, func: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], found: Sequence[Tensor], shared: Sequence[Tensor]) -> Any:
    """Run an op that meets no batched operand on aliases; its output is shared."""
    state = tr.shared
    subs: dict[int, tuple[Tensor, Tensor, Any]] = {}
    pairs: dict[int, tuple[Tensor, Tensor]] = {}
    for p in found:
        if id(p) in tr.views and tr.views[id(p)][0] is p:
            base = tr.base_param(p)
            a = state.alias(tr, base)
            region = tr.views[id(p)][2]
            subs[id(p)] = (p, a[region], None)
        else:
            base = p
            subs[id(p)] = (p, state.alias(tr, p), None)
        pairs[id(base)] = (base, state.alias(tr, base))
    for s in shared:
        for base, a in read(s, tr.batch_token) or ():
            pairs[id(base)] = (base, a)
    for t in flat((args, kwargs)):
        if (isinstance(t, Tensor) and t.requires_grad and id(t) not in subs
                and not any(t is s for s in shared)):
            raise UnsupportedModuleError(
                f"In module `{tr.module_path()}`, `{getattr(func, '__name__', func)}` uses "
                "trainable parameters without the batch, together with a tensor that requires "
                "grad but derives neither from the batch nor from the parameters (a value "
                "rebuilt from the data, e.g. through .tolist() or .item()): its gradient could "
                "not be credited to examples. Compute it from the model's inputs.")
    out = func(*replace_in(args, subs), **replace_in(kwargs, subs))
    _mark(out, tr.batch_token, tuple(pairs.values()))
    return out


def meet(tr: Tracer, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
         shared: Sequence[Tensor], src: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The op's arguments with each shared operand expanded along the batch and captured."""
    name = getattr(func, "__name__", "") or repr(func)
    top = list(args) + list(kwargs.values())
    if not all(any(s is t for t in top) for s in shared) or (
            name not in _ELEMENTWISE and name not in _MATMUL
            and name != "scaled_dot_product_attention"):
        raise _refuse(tr, name, "it does not broadcast the value against the batch")
    x, d = src[0], src[1]
    assert isinstance(x, Tensor)
    if d is None or batchdim.merged(x, tr.batch_token) is not None:
        raise _refuse(tr, name, "the batch's dimension is not known here (or it is merged "
                      "with another one)")
    tensors = [t for t in top if isinstance(t, Tensor)]
    m = max(t.dim() for t in tensors)
    if name == "scaled_dot_product_attention":
        # The mask (a position bias) broadcasts against the scores (..., L, S).
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        query = args[0] if args else kwargs.get("query")
        if not all(s is mask for s in shared) or query is not x:
            raise _refuse(tr, name, "only its attn_mask broadcasts against the batch")
        m = src[0].dim()
    if (name.startswith("__i") or (name.endswith("_") and not name.startswith("__"))) and (
            args and any(args[0] is s for s in shared)):
        raise _refuse(tr, name, "it writes the batch into the value in place")
    if name in _MATMUL and (min(t.dim() for t in tensors) < 2 or d >= x.dim() - 2):
        raise _refuse(tr, name, "a product over the batch's rows is not a broadcast")
    r = d + m - x.dim()
    B = tr.batch_size
    subs: dict[int, tuple[Tensor, Tensor, Any]] = {}
    for s in shared:
        pairs = read(s, tr.batch_token) or ()
        view = (1,) * (m - s.dim()) + tuple(s.shape)
        if view[r] != 1:
            raise _refuse(tr, name, f"its dimension {r - (m - s.dim())} (size {view[r]}) lies "
                          "where the batch is, so its rows would be taken for examples")
        shape = list(view)
        shape[r] = B
        s_det = s.detach()
        # The pull-back starts from the value as it is now, whatever later
        # in-place ops do to ``s``.
        snap = s.clone()
        bases = [p for p, _ in pairs]

        def compute(s_det: Tensor = s_det, view: tuple[int, ...] = view,
                    shape: list[int] = shape) -> Tensor:
            return s_det.reshape(view).expand(shape)

        exp = tr.track(compute, [], bases, _pull_back(tr, snap, pairs, r, B))
        tr.broadcast_batch(exp, r)
        subs[id(s)] = (s, exp, None)
    return replace_in(args, subs), replace_in(kwargs, subs)


def _pull_back(tr: Tracer, s: Tensor, pairs: Sequence[tuple[Tensor, Tensor]], r: int,
               B: int) -> Build:
    state = tr.shared
    aliases = [a for _, a in pairs]

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        del policy
        g = grads[0]
        if g is None:
            return []
        per_row = g.movedim(r, 0).reshape(B, *s.shape)
        state.pulling += 1
        try:
            per = torch.autograd.grad(s, aliases, per_row, retain_graph=True, allow_unused=True,
                                      is_grads_batched=True)
        finally:
            state.pulling -= 1
        return [PerSampleGrads(p, gp) for (p, _), gp in zip(pairs, per, strict=True)
                if gp is not None]

    return build


def _refuse(tr: Tracer, op: str, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"In module `{tr.module_path()}`, `{op}` combines the batch with a value computed from "
        "parameters without the batch (e.g. a relative position bias), but " + why + ": "
        "swiftdp cannot tell each example's share of the parameters' gradient. Combine the "
        "value with the batch by broadcasting (`scores + bias`, `x * scale`), with the batch in "
        "a dimension the value has size 1 or lacks."
    )
