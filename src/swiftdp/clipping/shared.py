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
import torch.nn.functional as F
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


# A lookup of a table without the batch: (table, looked-up rows, indices, padding_idx).
# Its per-example contribution is formed from the rows' per-example gradients
# (:func:`swiftdp.layers.embedding.lookup_contributions`), never a dense table.
Origin = tuple[Tensor, Tensor, Tensor, "int | None"]
_LOOKUPS = {"embedding"}


class SharedState:
    """The shared computations of one forward: the parameters' aliases."""

    def __init__(self) -> None:
        self.aliases: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, alias)
        self.dense: set[int] = set()  # parameters used by an op other than a lookup
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


def _origins(t: Any) -> tuple[Origin, ...]:
    m = getattr(t, ATTR, None)
    return () if m is None else m[2]


def _mark(out: Any, token: object, pairs: tuple[tuple[Tensor, Tensor], ...],
          origins: tuple[Origin, ...]) -> None:
    for t in flat(out) if isinstance(out, (list, tuple)) else [out]:
        if isinstance(t, Tensor) and t.requires_grad:
            try:
                setattr(t, ATTR, (token, pairs, origins))
            except (AttributeError, RuntimeError):
                pass


def table_lookup(args: tuple[Any, ...]) -> tuple[Tensor, Tensor] | None:
    """``(table, indices)`` when ``table[indices]`` picks rows of a 2-D table by integer ids."""
    if len(args) != 2 or not isinstance(args[0], Tensor) or args[0].dim() != 2:
        return None
    idx = args[1]
    if (not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int)
            or idx.dim() == 0):
        return None
    return args[0], idx


def _lookup(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[Tensor, Tensor, int | None] | None:
    """``(weight, indices, padding_idx)`` of a plain embedding call (no max_norm, ...)."""
    name = getattr(func, "__name__", "")
    if func is Tensor.__getitem__:
        got = table_lookup(args)
        return None if got is None else (got[0], got[1], None)
    if name not in _LOOKUPS:
        return None
    if func is torch.embedding:
        names: tuple[str, ...] = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")
    else:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                 "sparse")
    a = dict(zip(names, args, strict=False))
    a.update(kwargs)
    if "indices" in a:
        a["input"] = a.pop("indices")
    w, idx, pad = a.get("weight"), a.get("input"), a.get("padding_idx")
    if (not isinstance(w, Tensor) or not isinstance(idx, Tensor) or a.get("max_norm") is not None
            or a.get("scale_grad_by_freq") or a.get("sparse")):
        return None
    if pad is not None and pad < 0:
        pad = None if func is torch.embedding else int(w.shape[0]) + pad
    return w, idx, pad


def run_shared(tr: Tracer, func: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], found: Sequence[Tensor], shared: Sequence[Tensor]) -> Any:
    """Run an op that meets no batched operand on aliases; its output is shared."""
    state = tr.shared
    subs: dict[int, tuple[Tensor, Tensor, Any]] = {}
    pairs: dict[int, tuple[Tensor, Tensor]] = {}
    lookup = _lookup(func, args, kwargs)
    if lookup is not None and not any(lookup[0] is p for p in found):
        lookup = None
    if lookup is not None and not shared:
        w, idx, pad = lookup
        bd = tr.batch_dim if idx.dim() >= 2 else 0
        if (idx.dim() >= 2 and tr.batch_size > 1 and idx.shape[bd] == tr.batch_size
                and alike_rows(idx, bd)):
            # The same ids for every example, copied to the batch (BART's
            # arange(T).expand(B, T) + 2): one lookup, copied as virtual rows.
            one = run_shared(tr, F.embedding, (idx.narrow(bd, 0, 1), w, pad), {}, found, [])
            return _expanded(tr, one, tuple(one.shape), bd)
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
        if lookup is None or p is not lookup[0] or base is not p:
            state.dense.add(id(base))
    origins: dict[int, Origin] = {}
    for s in shared:
        for base, a in read(s, tr.batch_token) or ():
            pairs[id(base)] = (base, a)
        for o in _origins(s):
            origins[id(o[1])] = o
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
    if lookup is not None and isinstance(out, Tensor):
        # The model gets a copy: an in-place op on it leaves the rows the
        # pull-back reaches as they were looked up.
        origins[id(out)] = (lookup[0], out, lookup[1].detach(), lookup[2])
        out = out.clone()
    _mark(out, tr.batch_token, tuple(pairs.values()), tuple(origins.values()))
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
    merged = batchdim.merged(x, tr.batch_token)
    per = 1
    if merged is not None:  # Swin's windows (B * nW, ...): each example's rows share s
        if merged[0] != 0 or d != 0:
            raise _refuse(tr, name, "the batch is merged into a dimension other than the first")
        per = merged[1]
    if d is None:
        raise _refuse(tr, name, "the batch's dimension is not known here")
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
    subs: dict[int, tuple[Tensor, Tensor, Any]] = {}
    for s in shared:
        view = (1,) * (m - s.dim()) + tuple(s.shape)
        if per > 1 and r == 0 and s.dim() == m and s.shape[0] == tr.batch_size * per:
            blocks = s.detach().reshape(tr.batch_size, per, *s.shape[1:])
            if bool(torch.equal(blocks, blocks[:1].expand_as(blocks))):
                # The same rows for every example, tiled over the merged batch (Swin's
                # window mask expanded to B * nW and added to the bias): one copy tiled.
                one = s.reshape(tr.batch_size, per, *s.shape[1:])[0]
                setattr(one, ATTR, getattr(s, ATTR))  # the same parameters, the same origins
                subs[id(s)] = (s, _expanded(tr, one, tuple(one.shape), 0, tiled=True), None)
                continue
        if view[r] != 1:
            raise _refuse(tr, name, f"its dimension {r - (m - s.dim())} (size {view[r]}) lies "
                          "where the batch is, so its rows would be taken for examples")
        subs[id(s)] = (s, _expanded(tr, s, view, r, per=per), None)
    return replace_in(args, subs), replace_in(kwargs, subs)


def _expanded(tr: Tracer, s: Tensor, view: tuple[int, ...], r: int, tiled: bool = False,
              per: int = 1) -> Tensor:
    """``s`` viewed as ``view`` (size 1 at ``r``) expanded to the batch there: virtual rows.

    ``tiled``: ``s`` repeated ``B`` times along dimension 0 instead (``s.repeat(B,
    1, ...)``, DeBERTa's position keys against its ``(B * H, ...)`` batch): a
    batch merged into the rows, ``s.shape[0]`` per example. Each example's
    rows' gradient is captured and pulled back to the parameters as its
    contribution. ``per``: the batch it meets is merged into dimension 0,
    ``per`` rows per example (each example's rows share ``s``).
    """
    B = tr.batch_size
    pairs = read(s, tr.batch_token) or ()
    shape = list(view)
    shape[r] = B * per
    s_det = s.detach()
    # The pull-back starts from the value as it is now, whatever later
    # in-place ops do to ``s``.
    snap = s.clone()

    def compute() -> Tensor:
        if tiled:
            return s_det.repeat(B, *([1] * (s_det.dim() - 1)))
        return s_det.reshape(view).expand(shape)

    exp: Tensor = tr.track(compute, [], [p for p, _ in pairs],
                           _pull_back(tr, snap, pairs, _origins(s), r, B, per))
    if tiled:
        tr.mark_batched(exp, 0, batchdim.VIRTUAL, int(s.shape[0]))
    elif per > 1:
        tr.mark_batched(exp, 0, batchdim.VIRTUAL, per)
    else:
        tr.broadcast_batch(exp, r)
    return exp


_EXPANDS = frozenset({"expand", "repeat", "broadcast_to", "expand_as", "tile"})


def to_batch(tr: Tracer, func: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any], shared: Sequence[Tensor]) -> Tensor | None:
    """A shared value copied along the batch explicitly (``prompts.repeat(B, 1, 1)``).

    As for ``cls_token.expand(B, ...)``: the copies become virtual rows of the
    batch (dimension 0, or 1 for a sequence-first model), each credited to the
    example it stays with; ``None`` when the op is not such a copy.
    """
    name = getattr(func, "__name__", "")
    if name not in _EXPANDS or len(shared) != 1 or not args or args[0] is not shared[0]:
        return None
    s = shared[0]
    with torch.no_grad():
        ref = func(*args, **kwargs)
    if not isinstance(ref, Tensor) or ref.dim() < s.dim():
        return None
    r = tr.batch_dim if ref.dim() >= 3 else 0
    if (name == "repeat" and r == 0 and ref.dim() == s.dim() and s.shape[0] > 1
            and tuple(ref.shape) == (tr.batch_size * s.shape[0], *s.shape[1:])):
        return _expanded(tr, s, tuple(s.shape), 0, tiled=True)
    view = (1,) * (ref.dim() - s.dim()) + tuple(s.shape)
    want = list(view)
    want[r] = tr.batch_size
    if view[r] != 1 or tuple(ref.shape) != tuple(want):
        return None
    return _expanded(tr, s, view, r)


def alike_rows(idx: Tensor, dim: int) -> bool:
    """Whether every slice of ``idx`` along ``dim`` is the first (stride 0, or equal values)."""
    if idx.stride(dim) == 0:
        return True
    return bool(torch.equal(idx, idx.narrow(dim, 0, 1).expand_as(idx)))


def _pull_back(tr: Tracer, s: Tensor, pairs: Sequence[tuple[Tensor, Tensor]],
               origins: Sequence[Origin], r: int, B: int, per: int = 1) -> Build:
    """Per-example contributions from the gradient of the expanded copy of ``s``.

    A table used only by lookups is credited through the looked-up rows'
    per-example gradients (sparse, as a batched lookup); any other parameter
    through its alias (dense per-example gradients).
    """
    state = tr.shared

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        from swiftdp.layers.embedding import lookup_contributions

        rows = [o for o in origins if id(o[0]) not in state.dense]
        dense = [(p, a) for p, a in pairs if id(p) in state.dense]
        g0 = g.movedim(r, 0)
        if per > 1:  # an example's rows each met s: its gradient is their sum
            g0 = g0.reshape(B, per, *g0.shape[1:]).sum(1)
        per_row = g0.reshape(B, *s.shape)
        state.pulling += 1
        try:
            pulled = torch.autograd.grad(s, [o[1] for o in rows] + [a for _, a in dense],
                                         per_row, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)
        finally:
            state.pulling -= 1
        out: list[Contribution] = []
        tables: dict[int, list[tuple[Tensor, Tensor, int | None, Tensor]]] = {}
        for (w, _, idx, pad), gr in zip(rows, pulled[:len(rows)], strict=True):
            if gr is not None:
                tables.setdefault(id(w), []).append((w, idx, pad, gr))
        for uses in tables.values():
            # one contribution per table: its lookups' rows together (their
            # cross terms are the rows' own)
            w = uses[0][0]
            idx = torch.cat([i.reshape(-1) for _, i, _, _ in uses])
            gr = torch.cat([g.reshape(B, -1, g.shape[-1]) if pad is None else
                            g.reshape(B, -1, g.shape[-1]).masked_fill(
                                (i.reshape(1, -1, 1) == pad), 0.0)
                            for _, i, pad, g in uses], dim=1)
            out.extend(lookup_contributions(w, idx, None, gr, policy))
        out.extend(PerSampleGrads(p, gp) for (p, _), gp in zip(dense, pulled[len(rows):],
                                                                strict=True) if gp is not None)
        return out

    return build


def _refuse(tr: Tracer, op: str, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"In module `{tr.module_path()}`, `{op}` combines the batch with a value computed from "
        "parameters without the batch (e.g. a relative position bias), but " + why + ": "
        "swiftdp cannot tell each example's share of the parameters' gradient. Combine the "
        "value with the batch by broadcasting (`scores + bias`, `x * scale`), with the batch in "
        "a dimension the value has size 1 or lacks."
    )
