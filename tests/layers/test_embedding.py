"""Embedding rule (tied weights included) against the one-at-a-time oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import swiftdp
from support.harness import MODES, REDUCTIONS, check_against_oracle
from swiftdp.clipping.contributions import LinearFactors, PerSampleGrads, pair_inner
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers import embedding as emb_mod
from swiftdp.layers.embedding import NORM_METHODS, EmbeddingGrads, choose_norm_method


def _tokens(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """Random tokens with a guaranteed repeat in every example of length >= 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    if seq >= 2:
        x[:, -1] = x[:, 0]
    return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    batch=st.integers(0, 4),
    seq=st.integers(1, 5),
    vocab=st.integers(2, 5),
    dim=st.integers(1, 4),
    pad=st.sampled_from([None, 0, 1, -1]),
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_one_example_at_a_time_reference(
    mode, reduction, batch, seq, vocab, dim, pad, seed
):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=pad), nn.Tanh(), nn.Linear(dim, 3))
    model = model.double()
    x = _tokens(batch, seq, vocab, seed)
    y = torch.randn(batch, seq, 3, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
def test_one_token_per_example_and_sequence_first_layout(mode):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(4, 3, padding_idx=2), nn.Linear(3, 2)).double()
    labels = torch.tensor([0, 2, 2, 3, 0])  # (B,): a label embedding
    check_against_oracle(model, labels, torch.randn(5, 2, dtype=torch.float64), mode=mode)
    x = _tokens(6, 4, 3, 0).t().contiguous()  # (T, B)
    y = torch.randn(4, 6, 2, dtype=torch.float64)

    def per_example(out, t):
        return ((out - t) ** 2).sum((0, 2))

    check_against_oracle(model, x, y, mode=mode, batch_first=False, per_example=per_example)


class TinyLM(nn.Module):
    """Token + position embeddings, one hidden layer, output projection tied to the tokens."""

    def __init__(self, vocab: int, dim: int, seq: int, tie: str, pad: int | None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=pad)
        self.pos = nn.Parameter(torch.randn(seq, dim))
        self.hidden = nn.Linear(dim, dim)
        self.tie = tie
        if tie == "module":
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.tok.weight

    def forward(self, x):
        h = self.tok(x) + self.pos[: x.shape[1]]
        if self.tie == "twice":  # a second lookup of the same table
            h = h + 0.5 * self.tok(x.flip(1))
        h = torch.tanh(self.hidden(h))
        if self.tie == "module":
            return self.head(h)
        return F.linear(h, self.tok.weight)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tie", ["functional", "module", "twice"])
@given(
    batch=st.integers(0, 3),
    seq=st.integers(1, 4),
    vocab=st.integers(2, 5),
    pad=st.sampled_from([None, 1]),
    seed=st.integers(0, 2**16),
)
def test_tied_embedding_language_model_is_exact(mode, reduction, tie, batch, seq, vocab, pad, seed):
    torch.manual_seed(seed)
    model = TinyLM(vocab, 3, 4, tie, pad).double()
    x = _tokens(batch, seq, vocab, seed)
    y = torch.randn(batch, seq, vocab, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, reduction=reduction)


class DirectLookup(nn.Module):
    """Calls ``torch.embedding`` directly (negative padding index: none)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.pad = pad

    def forward(self, x):
        return torch.embedding(self.weight, x, self.pad).sum(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pad", [-1, 0, 3])
def test_torch_embedding_called_directly(mode, pad):
    torch.manual_seed(4)
    model = DirectLookup(pad).double()
    x = _tokens(5, 4, 4, 1)
    check_against_oracle(model, x, torch.randn(5, 3, dtype=torch.float64), mode=mode)


# --------------------------------------------------------- contribution algebra
def _dense_reference(c: EmbeddingGrads) -> torch.Tensor:
    B, T, d = c.g.shape
    out = torch.zeros(B, c.vocab, d, dtype=c.g.dtype)
    for i in range(B):
        for t in range(T):
            out[i, c.idx[i, t]] += c.g[i, t]
    return out


@given(
    batch=st.integers(0, 3),
    seq=st.integers(0, 6),
    seq2=st.integers(1, 5),
    vocab=st.integers(1, 5),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_every_norm_method_and_cross_term_equals_instantiation(
    batch, seq, seq2, vocab, dim, seed
):
    torch.manual_seed(seed)
    param = torch.zeros(vocab, dim, dtype=torch.float64)
    idx = _tokens(batch, seq, vocab, seed)
    g = torch.randn(batch, seq, dim, dtype=torch.float64)
    dense = _dense_reference(EmbeddingGrads(param, idx, g))
    want = dense.flatten(1).pow(2).sum(1)
    w = torch.rand(batch, dtype=torch.float64)
    for method in NORM_METHODS:
        c = EmbeddingGrads(param, idx, g, method=method)
        torch.testing.assert_close(c.sq_norms(), want)
        torch.testing.assert_close(c.weighted_sum(w), torch.einsum("b,bvd->vd", w, dense))
        torch.testing.assert_close(c.instantiate(), dense)

    # output projection F.linear(h, E): G'_i = g2_iᵀ h_i
    h = torch.randn(batch, seq2, dim, dtype=torch.float64)
    g2 = torch.randn(batch, seq2, vocab, dtype=torch.float64)
    lin_dense = torch.bmm(g2.transpose(1, 2), h)
    cross = (dense * lin_dense).flatten(1).sum(1)
    c = EmbeddingGrads(param, idx, g)
    for ghost in (True, False):
        lf = LinearFactors(param, h, g2, ghost=ghost)
        torch.testing.assert_close(pair_inner(lf, c), cross)
        torch.testing.assert_close(pair_inner(c, lf), cross)
    torch.testing.assert_close(pair_inner(c, PerSampleGrads(param, lin_dense)), cross)

    # a second lookup of the same table, by pairs and by matching segments
    idx2 = _tokens(batch, seq2, vocab, seed + 1)
    g3 = torch.randn(batch, seq2, dim, dtype=torch.float64)
    other = EmbeddingGrads(param, idx2, g3)
    cross2 = (dense * _dense_reference(other)).flatten(1).sum(1)
    torch.testing.assert_close(c.inner(other), cross2)
    saved = emb_mod._SCATTER_COST
    try:
        emb_mod._SCATTER_COST = 0.0  # force the segment matching
        torch.testing.assert_close(c.inner(other), cross2)
    finally:
        emb_mod._SCATTER_COST = saved


def test_cost_model_prefers_pairs_short_segments_long_dense_small_vocab():
    assert choose_norm_method(32, 8, 50000, 768) == "pairs"
    assert choose_norm_method(32, 1024, 50000, 768) == "segments"
    assert choose_norm_method(32, 1024, 10, 768) == "dense"
    assert choose_norm_method(32, 8, 50000, 768, allow_pairs=False) == "segments"
    assert choose_norm_method(32, 1024, 50000, 768, objective="memory") == "segments"


# --------------------------------------------------------------------- refusals
class Wrapped(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(5, 3, **kwargs), nn.Linear(3, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scale_grad_by_freq": True}, "mixes the examples.*scale_grad_by_freq=False"),
        ({"max_norm": 1.0}, "data-dependent.*max_norm=None"),
        ({"sparse": True}, "sparse=False"),
    ],
)
@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_batch_dependent_embedding_options_are_refused_naming_the_module(kwargs, needle, mode):
    model = Wrapped(**kwargs)
    weight_before = model.body[0].weight.detach().clone()
    with swiftdp.GradClipper(model, 1.0, mode=mode):
        with pytest.raises(UnsupportedModuleError, match=r"`body\.0`") as info:
            model(torch.tensor([[1, 2, 1], [0, 4, 4]]))
    assert info.match(needle)
    torch.testing.assert_close(model.body[0].weight.detach(), weight_before)  # no renorm happened


class SharedPositions(nn.Module):
    def __init__(self, expand: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(5, 3)
        self.pos = nn.Embedding(4, 3)
        self.expand = expand

    def forward(self, x):
        positions = torch.arange(x.shape[1])
        if self.expand:
            positions = positions.expand(x.shape[0], -1)
        return self.tok(x) + self.pos(positions)


@pytest.mark.parametrize("mode", MODES)
def test_position_lookup_without_a_batch_dimension_is_exact(mode):
    # pos(arange(T)) is (T, d), broadcast to the batch by the addition: each
    # example's gradient is the pull-back of its own row (swiftdp.clipping.shared).
    torch.manual_seed(5)
    model = SharedPositions().double()
    x = _tokens(4, 3, 5, 2)
    check_against_oracle(model, x, torch.randn(4, 3, 3, dtype=torch.float64), mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_position_lookup_expanded_to_the_batch_is_exact(mode):
    torch.manual_seed(5)
    model = SharedPositions(expand=True).double()
    x = _tokens(4, 3, 5, 2)
    check_against_oracle(model, x, torch.randn(4, 3, 3, dtype=torch.float64), mode=mode)
