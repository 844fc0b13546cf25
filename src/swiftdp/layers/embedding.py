"""Embedding tables (``F.embedding``, ``torch.embedding``), tied weights included.

Example ``i`` looks up rows ``x_{i,t}`` of the table ``E`` (``V × d``) and
receives output gradients ``g_{i,t}`` (``d``), so its gradient is
``G_i = Σ_t e_{x_t} g_tᵀ``: the rows it touched, each the sum of the
gradients of the positions that read it. Positions holding ``padding_idx``
give no gradient. Nothing of size ``B × T × V`` (one-hot) is ever formed.

Per-example squared norms, three exact ways, picked per batch by a cost
model:

* *pairs* (ghost style): ``‖G_i‖² = Σ_{t,s} 1[x_t = x_s] ⟨g_t, g_s⟩``,
  ``B T² d`` time, ``B T²`` memory; best for short sequences;
* *segments*: sort the (example, token) keys and sum the gradients of equal
  keys (``B T d`` plus a sort of ``B T`` keys): the non-zero rows of every
  ``G_i``; best for long sequences;
* *dense*: scatter into ``(B, V, d)``; best when ``V d`` is small.

The clipped sum ``Σ_i w_i G_i`` is one ``index_add`` of the rows
``w_i g_{i,t}`` (what ``embedding_dense_backward`` does for ``w = 1``).

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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.clipping.contributions import Contribution, LinearFactors, PerSampleGrads
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers.linear import raise_unbatched
from swiftdp.layers.registry import bind, register

if TYPE_CHECKING:
    from swiftdp.clipping.tracer import Tracer

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


class EmbeddingGrads(Contribution):
    """Per-example gradients of one embedding lookup, kept as (indices, output gradients).

    ``segments()`` holds exactly the non-zero rows of every ``G_i``: that is
    the instantiation used in ``per_sample`` mode (the dense ``(B, V, d)``
    form only when it is cheaper), so no mode ever forms a one-hot.

    Args:
        param: the table ``E`` (``V × d``).
        idx: token indices ``(B, T)`` (int64).
        g: output gradients ``(B, T, d)``, already zero at padding positions.
        method: how :meth:`sq_norms` works, one of :data:`NORM_METHODS`.
    """

    def __init__(self, param: Tensor, idx: Tensor, g: Tensor, *, method: str = "segments") -> None:
        if method not in NORM_METHODS:
            raise ValueError(f"Expected method in {NORM_METHODS}, got {method!r}.")
        self.param = param
        self.idx = idx
        self.g = g
        self.method = method
        self.vocab = int(param.shape[0])
        self._seg: tuple[Tensor, Tensor] | None = None
        self._sq: Tensor | None = None

    # ------------------------------------------------------------ representations
    def segments(self) -> tuple[Tensor, Tensor]:
        """The non-zero rows of every ``G_i``, sorted by (example, row).

        Returns:
            ``keys`` ``(U,)`` equal to ``i · V + row`` and ``sums`` ``(U, d)``,
            the gradient of that row for that example.
        """
        if self._seg is None:
            B, _, d = self.g.shape
            offs = torch.arange(B, device=self.idx.device, dtype=torch.long) * self.vocab
            keys = (self.idx + offs.unsqueeze(1)).reshape(-1)
            uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
            sums = self.g.new_zeros(uniq.shape[0], d).index_add_(0, inv, self.g.reshape(-1, d))
            self._seg = (uniq, sums)
        return self._seg

    def instantiate(self) -> Tensor:
        B, _, d = self.g.shape
        offs = torch.arange(B, device=self.idx.device, dtype=torch.long) * self.vocab
        keys = (self.idx + offs.unsqueeze(1)).reshape(-1)
        dense = self.g.new_zeros(B * self.vocab, d).index_add_(0, keys, self.g.reshape(-1, d))
        return dense.view(B, self.vocab, d)

    # ------------------------------------------------------------------- norms
    def sq_norms(self) -> Tensor:
        if self._sq is None:
            self._sq = self._compute_sq_norms()
        return self._sq

    def _compute_sq_norms(self) -> Tensor:
        B, T, _ = self.g.shape
        if T <= 1:
            return self.g.pow(2).sum((1, 2))
        if self.method == "pairs":
            gg = torch.bmm(self.g, self.g.transpose(1, 2))
            same = self.idx.unsqueeze(2) == self.idx.unsqueeze(1)
            return (gg * same).sum((1, 2))
        if self.method == "dense":
            return self.instantiate().flatten(1).pow(2).sum(1)
        keys, sums = self.segments()
        out = self.g.new_zeros(B)
        return out.index_add_(0, keys // self.vocab, sums.pow(2).sum(1))

    def weighted_sum(self, weights: Tensor) -> Tensor:
        w = weights.to(self.g.dtype)
        d = self.g.shape[2]
        out = self.g.new_zeros(self.vocab, d)
        if self._seg is not None:
            keys, sums = self._seg
            return out.index_add_(0, keys % self.vocab, sums * w[keys // self.vocab].unsqueeze(1))
        rows = (self.g * w.view(-1, 1, 1)).reshape(-1, d)
        return out.index_add_(0, self.idx.reshape(-1), rows)

    # ------------------------------------------------------------- cross terms
    def inner(self, other: Contribution) -> Tensor | None:
        """Per-example ``⟨G_i, H_i⟩`` with another use of the table, never ``B × V × d``.

        Handles another lookup (:class:`EmbeddingGrads`), an output
        projection ``F.linear(h, E)`` (:class:`LinearFactors`, ghost or
        instantiated) and instantiated :class:`PerSampleGrads`.
        """
        if other.region is not None or other.region_shape() != self.param.shape:
            return None
        if isinstance(other, EmbeddingGrads):
            return self._inner_embedding(other)
        if isinstance(other, LinearFactors):
            if other.grads is not None:
                return self._inner_dense(other.grads)
            assert other.a is not None and other.g is not None
            return self._inner_factors(other.a, other.g)
        if isinstance(other, PerSampleGrads):
            return self._inner_dense(other.grads)
        return None

    def _inner_dense(self, grads: Tensor) -> Tensor:
        """``Σ_t ⟨g_t, H_i[x_t]⟩`` for instantiated ``H`` ``(B, V, d)``: a gather."""
        B, T, d = self.g.shape
        h = grads.reshape(B, self.vocab, d).to(self.g.dtype)
        rows = h.gather(1, self.idx.unsqueeze(2).expand(B, T, d))
        return (rows * self.g).sum((1, 2))

    def _inner_factors(self, a: Tensor, g2: Tensor) -> Tensor:
        """``Σ_t Σ_s g2_s[x_t] ⟨g_t, a_s⟩`` for ``H_i = g2_iᵀ a_i`` (tied output projection)."""
        B, T, _ = self.g.shape
        S = a.shape[1]
        ga = torch.bmm(self.g, a.to(self.g.dtype).transpose(1, 2))  # (B, T, S)
        picked = g2.to(self.g.dtype).gather(2, self.idx.unsqueeze(1).expand(B, S, T))  # (B, S, T)
        return (ga * picked.transpose(1, 2)).sum((1, 2))

    def _inner_embedding(self, other: EmbeddingGrads) -> Tensor:
        """``Σ_{t,s} 1[x_t = y_s] ⟨g_t, h_s⟩`` by pairs or by matching segments."""
        B, T1, d = self.g.shape
        T2 = other.g.shape[1]
        seg_cost = _SCATTER_COST * (T1 + T2) * (2 * d + math.log2(B * (T1 + T2) + 2))
        if T1 * T2 * (d + 2 * _SCATTER_COST) <= seg_cost:
            gh = torch.bmm(self.g, other.g.to(self.g.dtype).transpose(1, 2))
            same = self.idx.unsqueeze(2) == other.idx.unsqueeze(1)
            return (gh * same).sum((1, 2))
        k1, s1 = self.segments()
        k2, s2 = other.segments()
        out = self.g.new_zeros(B)
        if k1.numel() == 0 or k2.numel() == 0:
            return out
        pos = torch.searchsorted(k1, k2).clamp(max=k1.shape[0] - 1)
        hit = k1[pos] == k2
        vals = (s1[pos] * s2.to(s1.dtype)).sum(1) * hit
        return out.index_add_(0, k2 // self.vocab, vals)


# ------------------------------------------------------------------------ rules
def embedding_use(
    tr: Tracer,
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
        tr: the active tracer.
        idx: integer indices, batched along ``tr.batch_dim`` (dim 0 when 1-D).
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
    _refuse_options(tr, max_norm, scale_grad_by_freq, sparse)
    if idx.dim() < 1:
        raise_unbatched(tr, idx)
    bd = tr.batch_dim if idx.dim() >= 2 else 0
    _check_batched_indices(tr, idx, bd)
    wd = weight.detach()
    V = int(weight.shape[0])
    pad = padding_idx

    def run() -> Tensor:
        return F.embedding(idx, wd, pad)

    def build(grads: list[Tensor | None]) -> list[Contribution]:
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
            B, i2.shape[1], V, g3.shape[2], objective=tr.engine.cost_objective,
            allow_pairs=tr.engine.mode != "per_sample",
        )
        return [EmbeddingGrads(weight, i2, g3, method=method)]

    return tr.track(run, [idx], [weight], build)


def _check_batched_indices(tr: Tracer, idx: Tensor, bd: int) -> None:
    if idx.shape[bd] != tr.batch_size:
        raise UnsupportedModuleError(
            f"In module `{tr.module_path()}`, the embedding got indices of shape "
            f"{tuple(idx.shape)}, whose dimension {bd} should be the batch of size "
            f"{tr.batch_size}. Indices shared by the whole batch (a position lookup such as "
            "`pos_emb(torch.arange(T))`) give one gradient for all examples, which cannot be "
            "clipped per example: expand them to the batch (`pos_emb(positions.expand(B, T))`) "
            "or add an nn.Parameter position table to the activations. If the model is "
            f"sequence-first, pass batch_first={not tr.engine.batch_first}."
        )


def _refuse_options(tr: Tracer, max_norm: Any, scale_grad_by_freq: bool, sparse: bool) -> None:
    where = f"In module `{tr.module_path()}`, the embedding"
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


@register(F.embedding)
def embedding_rule(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.embedding``."""
    a = bind(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        args, kwargs,
        {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
         "sparse": False},
    )
    weight = a["weight"]
    if not tr.is_trainable(weight):
        return func(*args, **kwargs)
    pad = a["padding_idx"]
    if pad is not None and pad < 0:
        pad = int(weight.shape[0]) + pad
    return embedding_use(
        tr, a["input"], weight, pad, max_norm=a["max_norm"],
        scale_grad_by_freq=bool(a["scale_grad_by_freq"]), sparse=bool(a["sparse"]),
    )


@register(torch.embedding)
def torch_embedding_rule(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.embedding(weight, indices, padding_idx=-1, ...)`` (negative: none)."""
    a = bind(
        ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"), args, kwargs,
        {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False},
    )
    weight = a["weight"]
    if not tr.is_trainable(weight):
        return func(*args, **kwargs)
    pad = a["padding_idx"]
    return embedding_use(
        tr, a["indices"], weight, pad if pad is not None and pad >= 0 else None,
        scale_grad_by_freq=bool(a["scale_grad_by_freq"]), sparse=bool(a["sparse"]),
    )
