"""Embedding tables (``F.embedding``, ``torch.embedding``), tied weights included.

Example ``i`` looks up rows ``x_{i,t}`` of the table ``E`` (``V × d``) and
receives output gradients ``g_{i,t}`` (``d``), so its gradient is
``G_i = Σ_t e_{x_t} g_tᵀ``: the rows it touched, each the sum of the
gradients of the positions that read it. Positions holding ``padding_idx``
give no gradient. Nothing of size ``B × T × V`` (one-hot) is ever formed.

Repeated lookups of a row by one example are first merged into one row per
(example, row), three exact ways, picked per batch by a cost model:

* *pairs*: ``r = 1[x_t = x_s] g`` (a ``T × T`` equality matmul), ``B T² d``
  time, ``B T²`` memory; best for short sequences;
* *segments*: sort the (example, token) keys and sum the gradients of equal
  keys (``B T d`` plus a sort of ``B T`` keys); best for long sequences;
* *dense*: scatter into ``(B · V, d)``; best when ``V d`` is small.

The merged rows are the non-zero rows of every ``G_i``, so ``‖G_i‖²`` is a sum
of squares: the pairwise form ``Σ_{t,s} 1[x_t = x_s] ⟨g_t, g_s⟩``, whose terms
of opposite signs cancel in float32 (a token repeated with opposite output
gradients looks small), is never summed. The clipped sum ``Σ_i w_i G_i`` is
one ``index_add`` of the merged rows ``w_i r_{i,t}``, exactly what was
measured.

Tied weights (GPT-style output projection ``F.linear(h, E)``, whose use is a
:class:`~swiftdp.clipping.contributions.LinearFactors` ``G'_i = g'_iᵀ h_i``)
get the exact cross term ``⟨G_i, G'_i⟩ = Σ_t Σ_s g'_s[x_t] ⟨g_t, h_s⟩``
without instantiating ``B × V × d``.

References:
    Li, Tramèr, Liang, Hashimoto. Large language models can be strong
    differentially private learners. ICLR 2022 (ghost norm of embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.clipping.contract import Unbatched
from swiftdp.clipping.contributions import (
    F64,
    U64,
    Contribution,
    LinearFactors,
    PerSampleGrads,
    SlackParts,
    compute_dtype,
    gamma,
    norms_f64,
    slack_from_parts,
    sq_norms_f64,
    weighted_sum_error,
)
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind, check_batch, raise_unbatched

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder

# Cost of one element of a scatter, gather or sort relative to one
# multiply-add of a batched matmul (measured order of magnitude on CPU).
_SCATTER_COST = 32.0

NORM_METHODS = ("pairs", "segments", "dense")


def choose_norm_method(
    batch: int, seq_len: int, vocab: int, dim: int, *, objective: str = "time",
    allow_pairs: bool = True,
) -> str:
    """Pick the cheapest exact way to get the per-example norms of an embedding use.

    Args:
        batch: ``B``.
        seq_len: ``T``, lookups per example.
        vocab: ``V``, rows of the table.
        dim: ``d``, width of a row.
        objective: ``"time"`` (arithmetic) or ``"memory"`` (held per example).
        allow_pairs: ``False`` excludes the ghost-style pairwise method
            (``per_sample`` mode instantiates every per-example gradient).

    Returns:
        ``"pairs"``, ``"segments"`` or ``"dense"``.
    """
    t, v, d = seq_len, vocab, dim
    if objective == "memory":
        costs = {"pairs": float(t * t), "segments": float(t * d), "dense": float(v * d)}
    else:
        costs = {
            "pairs": t * t * (d + 2 * _SCATTER_COST),
            "segments": _SCATTER_COST * (2 * t * d + t * math.log2(batch * t + 2)),
            "dense": _SCATTER_COST * (t * d + 2 * v * d),
        }
    if not allow_pairs:
        del costs["pairs"]
    return min(costs, key=lambda k: costs[k])


def _merge_by_pairs(idx: Tensor, g: Tensor) -> Tensor:
    """Merged rows ``(B, T, d)`` by a ``T × T`` equality matmul (short sequences)."""
    T = g.shape[1]
    same = idx.unsqueeze(2) == idx.unsqueeze(1)
    r = torch.bmm(same.to(g.dtype), g)
    earlier = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)
    repeat = (same & earlier).any(2)
    return torch.where(repeat.unsqueeze(2), 0.0, r)


class EmbeddingGrads(Contribution):
    """Per-example gradients of one embedding lookup, repeated rows merged.

    Repeated lookups of a row by one example are merged at construction, so
    every non-zero row of ``G_i`` is held once: ``‖G_i‖²`` is a sum of squares
    (``⟨g_t, g_s⟩`` of opposite signs at repeated tokens cannot hide a large
    gradient, as the pairwise form would in float32) and the clipped sum adds
    exactly the rows whose norms were taken. Two representations:

    * ``"pairs"`` (and ``T <= 1``): *merged rows* ``r`` ``(B, T, d)``, row ``t``
      equal to ``Σ_{s: x_s = x_t} g_s`` at the first position ``t`` of each
      token in its example and zero elsewhere, by a ``T × T`` equality matmul;
    * ``"segments"`` / ``"dense"``: the sorted non-zero rows ``(keys, sums)``
      (keys ``i · V + row``), by a sort of the ``B T`` keys, or by a scatter
      into all ``B · V`` rows when that is cheaper.

    ``segments()`` is also the instantiation used in ``per_sample`` mode, so
    no mode ever forms a one-hot.

    Args:
        param: the table ``E`` (``V × d``).
        idx: token indices ``(B, T)`` (int64).
        g: output gradients ``(B, T, d)``, already zero at padding positions.
        method: how repeated rows are merged, one of :data:`NORM_METHODS`.
    """

    def __init__(self, param: Tensor, idx: Tensor, g: Tensor, *, method: str = "segments") -> None:
        if method not in NORM_METHODS:
            raise ValueError(f"Expected method in {NORM_METHODS}, got {method!r}.")
        self.param = param
        self.idx = idx
        self.method = method
        self.vocab = int(param.shape[0])
        self.batch, self.seq, self.dim = (int(s) for s in g.shape)
        g = g.to(compute_dtype(g))
        self._rows: Tensor | None = None
        self._seg: tuple[Tensor, Tensor] | None = None
        self._inv: Tensor | None = None
        if self.seq <= 1 or self.batch == 0:
            self._rows = g
        elif method == "pairs":
            self._rows = _merge_by_pairs(idx, g)
        else:
            keys = self._keys()
            if method == "dense":
                uniq, inv = torch.arange(self.batch * self.vocab, device=keys.device), keys
            else:
                uniq, inv = _unique_padded(keys)
            sums = g.new_zeros(uniq.shape[0], self.dim).index_add_(0, inv, g.reshape(-1, self.dim))
            self._seg, self._inv = (uniq, sums), inv
        self._sq: Tensor | None = None
        self._mass: Tensor | None = None

    # ------------------------------------------------------------ representations
    @property
    def g(self) -> Tensor:
        """The merged rows ``(B, T, d)`` (formed from the segments on first use)."""
        if self._rows is None:
            assert self._seg is not None and self._inv is not None
            inv, sums = self._inv, self._seg[1]
            pos = torch.arange(inv.shape[0], device=inv.device)
            first = torch.full((sums.shape[0],), inv.shape[0], dtype=torch.long, device=inv.device)
            first = first.scatter_reduce_(0, inv, pos, "amin")
            keep = (first[inv] == pos).unsqueeze(1)
            self._rows = torch.where(keep, sums[inv], 0.0).view(self.batch, self.seq, self.dim)
        return self._rows

    def segments(self) -> tuple[Tensor, Tensor]:
        """The non-zero rows of every ``G_i``, sorted by (example, row).

        Returns:
            ``keys`` ``(U,)`` equal to ``i · V + row`` and ``sums`` ``(U, d)``,
            the gradient of that row for that example (some may be zero). ``U``
            is the number of lookups ``B · T``, not the number of distinct
            keys: the keys after the distinct ones repeat the largest key with
            zero sums (:func:`_unique_padded`; no read of the count).
        """
        if self._seg is None:
            rows = self.g
            uniq, inv = _unique_padded(self._keys())
            sums = rows.new_zeros(uniq.shape[0], self.dim).index_add_(
                0, inv, rows.reshape(-1, self.dim))
            self._seg = (uniq, sums)
        return self._seg

    def _keys(self) -> Tensor:
        offs = torch.arange(self.batch, device=self.idx.device, dtype=torch.long) * self.vocab
        return (self.idx + offs.unsqueeze(1)).reshape(-1)

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        keys, sums = self.segments()
        s = sums if dtype is None else sums.to(dtype)
        dense = s.new_zeros(self.batch * self.vocab, self.dim).index_add_(0, keys, s)
        return dense.view(self.batch, self.vocab, self.dim)

    # ------------------------------------------------------------------- norms
    def _per_example(self, row_values: Tensor) -> Tensor:
        """Sum float64 values of the non-zero rows into their examples."""
        keys, _ = self.segments()
        out = row_values.new_zeros(self.batch)
        return out.index_add_(0, keys // self.vocab, row_values)

    def sq_norms(self) -> Tensor:
        if self._sq is None:
            # float64 sums, block by block (no float64 copy of the rows)
            if self._rows is not None:
                n, k = sq_norms_f64(self._rows.flatten(1))
            else:
                assert self._seg is not None
                n, k = sq_norms_f64(self._seg[1])
                n, k = self._per_example(n), k + self.seq
            self._sq = n.mul_(1.0 + gamma(max(self.seq * self.dim + 2, k), U64))
        return self._sq

    def mass(self) -> Tensor:
        if self._mass is None:
            if self._rows is not None:
                r, k = norms_f64(self._rows.reshape(-1, self.dim))
                n = r.view(self.batch, self.seq).sum(1)
            else:
                assert self._seg is not None
                r, k = norms_f64(self._seg[1])
                n = self._per_example(r)
            self._mass = n.mul_(1.0 + gamma(max(self.dim + 2, k) + self.seq, U64))
        return self._mass

    slack = slack_from_parts

    def slack_parts(self) -> SlackParts:
        # One term per (example, row) after merging: exact for any summation order.
        vals = self._rows if self._rows is not None else self.segments()[1]
        return weighted_sum_error(0, self.batch, vals.dtype, vals.device), None

    def weighted_sum(self, weights: Tensor, dropped: Tensor | None = None) -> Tensor:
        if self._rows is not None:
            vals = self._rows * weights.to(self._rows.dtype).view(-1, 1, 1)
            if dropped is not None:
                vals = torch.where(dropped.view(-1, 1, 1), 0.0, vals)
            idx, rows = self.idx.reshape(-1), vals.reshape(-1, self.dim)
        else:
            assert self._seg is not None
            keys, sums = self._seg
            ex, idx = keys // self.vocab, keys % self.vocab
            rows = sums * weights.to(sums.dtype)[ex].unsqueeze(1)
            if dropped is not None:
                rows = torch.where(dropped[ex].unsqueeze(1), 0.0, rows)
        return rows.new_zeros(self.vocab, self.dim).index_add_(0, idx, rows)

    # ------------------------------------------------------------- cross terms
    def inner_bound(self, other: Contribution) -> tuple[Tensor, Tensor] | None:
        """Per-example ``⟨G_i, H_i⟩`` with another use of the table, never ``B × V × d``.

        Handles another lookup (:class:`EmbeddingGrads`), an output
        projection ``F.linear(h, E)`` (:class:`LinearFactors`, ghost or
        instantiated) and instantiated :class:`PerSampleGrads`. Computed in
        float64; the bound is ``γ_n`` times the two uses' masses.
        """
        if other.region is not None or other.region_shape() != self.param.shape:
            return None
        if isinstance(other, EmbeddingGrads):
            v, n = self._inner_embedding(other)
        elif isinstance(other, LinearFactors):
            if other.grads is not None:
                v, n = self._inner_dense(other.grads)
            else:
                assert other.a is not None and other.g is not None
                v, n = self._inner_factors(other.a, other.g)
        elif isinstance(other, PerSampleGrads):
            v, n = self._inner_dense(other.grads)
        else:
            return None
        return v, gamma(n, U64) * self.mass() * other.mass()

    def _inner_dense(self, grads: Tensor) -> tuple[Tensor, int]:
        """``Σ_t ⟨r_t, H_i[x_t]⟩`` for instantiated ``H`` ``(B, V, d)``: a gather."""
        B, T, d = self.g.shape
        h = grads.reshape(B, self.vocab, d)
        rows = h.gather(1, self.idx.unsqueeze(2).expand(B, T, d))
        return (rows.to(F64) * self.g.to(F64)).sum((1, 2)), T * d + 4

    def _inner_factors(self, a: Tensor, g2: Tensor) -> tuple[Tensor, int]:
        """``Σ_t Σ_s g2_s[x_t] ⟨r_t, a_s⟩`` for ``H_i = g2_iᵀ a_i`` (tied output projection)."""
        B, T, d = self.g.shape
        S = a.shape[1]
        ga = torch.bmm(self.g.to(F64), a.to(F64).transpose(1, 2))  # (B, T, S)
        picked = g2.gather(2, self.idx.unsqueeze(1).expand(B, S, T)).to(F64)  # (B, S, T)
        return (ga * picked.transpose(1, 2)).sum((1, 2)), d + T * S + 4

    def _inner_embedding(self, other: EmbeddingGrads) -> tuple[Tensor, int]:
        """``Σ_{t,s} 1[x_t = y_s] ⟨r_t, h_s⟩`` by pairs or by matching segments."""
        B, T1, d = self.g.shape
        T2 = other.g.shape[1]
        n = d + T1 * T2 + 4
        seg_cost = _SCATTER_COST * (T1 + T2) * (2 * d + math.log2(B * (T1 + T2) + 2))
        if T1 * T2 * (d + 2 * _SCATTER_COST) <= seg_cost:
            gh = torch.bmm(self.g.to(F64), other.g.to(F64).transpose(1, 2))
            same = self.idx.unsqueeze(2) == other.idx.unsqueeze(1)
            return (gh * same).sum((1, 2)), n
        k1, s1 = self.segments()
        k2, s2 = other.segments()
        out = self.g.new_zeros(B, dtype=F64)
        if k1.numel() == 0 or k2.numel() == 0:
            return out, n
        pos = torch.searchsorted(k1, k2).clamp(max=k1.shape[0] - 1)
        hit = k1[pos] == k2
        vals = (s1[pos].to(F64) * s2.to(F64)).sum(1) * hit
        return out.index_add_(0, k2 // self.vocab, vals), n


def _unique_padded(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(keys, sorted=True, return_inverse=True)`` without reading the count.

    The distinct keys come first, sorted; the ``n - U`` entries after them
    repeat the largest key (the list stays sorted), and no lookup maps to
    them, so the rows summed there stay zero. ``torch.unique``'s output size
    depends on the values: on an accelerator it waits for the device.
    """
    n = keys.numel()
    if n == 0:
        return keys.clone(), keys.clone()
    ordered, order = keys.sort()
    new = torch.ones(n, dtype=torch.bool, device=keys.device)
    new[1:] = ordered[1:] != ordered[:-1]
    seg = new.cumsum(0).sub_(1)  # distinct-key index of each sorted lookup
    inv = torch.empty_like(seg).scatter_(0, order, seg)
    uniq = ordered[-1:].expand(n).clone().scatter_(0, seg, ordered)
    return uniq, inv


# ------------------------------------------------------------------------ rules
def embedding_use(
    rec: Recorder,
    idx: Tensor,
    weight: Tensor,
    padding_idx: int | None,
    *,
    max_norm: float | None = None,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """Look up ``weight`` rows at ``idx`` and capture the use for clipping.

    Args:
        rec: the active tracer.
        idx: integer indices, batched along ``rec.site.batch_dim`` (dim 0 when 1-D).
        weight: the table ``(V, d)``, a trainable parameter.
        padding_idx: row that receives no gradient (non-negative), or ``None``.
        max_norm: must be ``None`` (see Raises).
        scale_grad_by_freq: must be ``False`` (see Raises).
        sparse: must be ``False`` (see Raises).

    Returns:
        The looked-up rows, identical to ``F.embedding``'s output.

    Raises:
        UnsupportedModuleError: ``scale_grad_by_freq=True`` (the gradient of a
            row is divided by its frequency in the whole batch, so examples are
            mixed), ``max_norm`` set (rows looked up by the private batch are
            renormalised in place, a data-dependent change of the weights that
            no noise covers), ``sparse=True`` (sparse gradients), an unbatched
            or wrongly batched index.
    """
    _refuse_options(rec, max_norm, scale_grad_by_freq, sparse)
    if idx.dim() < 1:
        raise_unbatched(rec.site, idx)
    bd = rec.site.batch_dim if idx.dim() >= 2 else 0
    idx = _batched_indices(rec, idx, bd)
    check_batch(rec.site, idx, bd, "the embedding's indices")
    wd = weight.detach()
    V = int(weight.shape[0])
    pad = padding_idx

    def run() -> Tensor:
        return F.embedding(idx, wd, pad)

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        i2 = idx.movedim(bd, 0) if bd else idx
        g2 = g.movedim(bd, 0) if bd else g
        B = i2.shape[0]
        T = i2[0].numel() if B else math.prod(i2.shape[1:])
        i2 = i2.reshape(B, T).long()
        g3 = g2.reshape(B, T, g2.shape[-1])
        if pad is not None:
            g3 = g3.masked_fill((i2 == pad).unsqueeze(2), 0.0)
        method = choose_norm_method(
            B, i2.shape[1], V, g3.shape[2], objective=policy.cost_objective,
            allow_pairs=policy.allow_pairs,
        )
        return [EmbeddingGrads(weight, i2, g3, method=method)]

    return rec.track(run, [idx], [weight], build)


def _batched_indices(rec: Recorder, idx: Tensor, bd: int) -> Tensor:
    """The indices, which must carry the batch along ``bd`` (tracked, never read from a size).

    Indices that do not derive from the batch (a position lookup
    ``wpe(position_ids)`` with ids of shape ``(1, T)``, Hugging Face's default;
    a ``(T, T)`` relative-position table; BART's ``arange(T).expand(B, T)``)
    look up the same rows for every example: the rule refuses them with
    :class:`~swiftdp.clipping.contract.Unbatched`, and the dispatcher runs the
    lookup without the batch, crediting each example where the rows meet it
    (:func:`lookup_contributions`).
    """
    if rec.site.carries_batch(idx) and idx.shape[bd] == rec.site.batch_size:
        return idx
    raise _unbatched_indices(rec, idx, bd)


def lookup_contributions(weight: Tensor, idx: Tensor, padding_idx: int | None, grads: Tensor,
                         policy: Policy) -> list[Contribution]:
    """Per-example contributions of a lookup without the batch.

    Args:
        weight: the table ``(V, d)``.
        idx: the indices, of any shape ``S``, the same for every example.
        padding_idx: row that receives no gradient, or ``None``.
        grads: example ``b``'s gradient of the looked-up rows at ``grads[b]``,
            ``(B, *S, d)``.
        policy: the mode's choices.
    """
    B, d = grads.shape[0], grads.shape[-1]
    n = idx.numel()
    i2 = idx.reshape(1, n).long().expand(B, n)
    g3 = grads.reshape(B, n, d)
    if padding_idx is not None:
        g3 = g3.masked_fill((i2 == padding_idx).unsqueeze(2), 0.0)
    method = choose_norm_method(B, n, int(weight.shape[0]), d, objective=policy.cost_objective,
                                allow_pairs=policy.allow_pairs)
    return [EmbeddingGrads(weight, i2, g3, method=method)]


def _unbatched_indices(rec: Recorder, idx: Tensor, bd: int) -> UnsupportedModuleError:
    kind = UnsupportedModuleError if rec.site.carries_batch(idx) else Unbatched
    return kind(
        f"In module `{rec.site.module_path}`, the embedding got indices of shape "
        f"{tuple(idx.shape)}, whose dimension {bd} should be the batch of size "
        f"{rec.site.batch_size} (tracked from the model's inputs, not read from sizes). "
        "Keep the batch where the layer reads it (undo the transpose or reshape); if the "
        f"model is sequence-first, pass batch_first={not rec.site.batch_first}."
    )


def _refuse_options(rec: Recorder, max_norm: Any, scale_grad_by_freq: bool, sparse: bool) -> None:
    where = f"In module `{rec.site.module_path}`, the embedding"
    if scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"{where} has scale_grad_by_freq=True: each row's gradient is divided by how often "
            "the token occurs in the whole batch, which mixes the examples, so per-example "
            "gradients (and differential privacy) are undefined. Set scale_grad_by_freq=False."
        )
    if max_norm is not None:
        raise UnsupportedModuleError(
            f"{where} has max_norm={max_norm!r}: every forward renormalises, in place, the rows "
            "that the private batch looks up, a data-dependent change of the weights that the "
            "DP noise does not cover. Set max_norm=None; to keep rows bounded, renormalise all "
            "rows after each optimiser step (e.g. `emb.weight.data.renorm_(2, 0, max_norm)`), "
            "which does not depend on the data."
        )
    if sparse:
        raise UnsupportedModuleError(
            f"{where} has sparse=True: swiftdp writes dense clipped gradients (noise is added to "
            "every row anyway). Set sparse=False and use a dense optimiser."
        )


def embedding_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.embedding``."""
    a = bind(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        args, kwargs,
        {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
         "sparse": False},
    )
    weight = a["weight"]
    if not rec.site.is_trainable(weight):
        return func(*args, **kwargs)
    pad = a["padding_idx"]
    if pad is not None and pad < 0:
        pad = int(weight.shape[0]) + pad
    return embedding_use(
        rec, a["input"], weight, pad, max_norm=a["max_norm"],
        scale_grad_by_freq=bool(a["scale_grad_by_freq"]), sparse=bool(a["sparse"]),
    )


def torch_embedding_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.embedding(weight, indices, padding_idx=-1, ...)`` (negative: none)."""
    a = bind(
        ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"), args, kwargs,
        {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False},
    )
    weight = a["weight"]
    if not rec.site.is_trainable(weight):
        return func(*args, **kwargs)
    pad = a["padding_idx"]
    return embedding_use(
        rec, a["indices"], weight, pad if pad is not None and pad >= 0 else None,
        scale_grad_by_freq=bool(a["scale_grad_by_freq"]), sparse=bool(a["sparse"]),
    )
