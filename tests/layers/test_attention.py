"""Stock nn.MultiheadAttention and Transformer layers against the one-at-a-time oracle."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import swiftdp
from support.harness import MODES, REDUCTIONS, check_against_oracle
from swiftdp.clipping import generic
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers import RULES

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread avoids thread-pool stalls on loaded CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def rule_used(*, exclusive: bool = False):
    """Count calls of the attention rule, so that a generic fallback cannot pass unnoticed.

    With ``exclusive``, any parameter falling back to the generic (torch.func)
    rule fails the test.
    """
    calls: list[int] = []
    rule = RULES[F.multi_head_attention_forward]
    capture = generic.capture_module_output

    def spy(*args):
        calls.append(1)
        return rule(*args)

    def boom(engine, call, output):
        raise AssertionError(f"generic rule used for {call.path}")

    RULES[F.multi_head_attention_forward] = spy
    if exclusive:
        generic.capture_module_output = boom
    try:
        yield calls
    finally:
        RULES[F.multi_head_attention_forward] = rule
        generic.capture_module_output = capture


def to_batch(t, bd):
    """Carry a ``(B, ...)`` tensor as an input with the batch at ``bd`` and >= 3 dims."""
    if t is None:
        return None
    if t.dim() == 2:
        t = t.unsqueeze(-1)
    return t.movedim(0, bd) if bd else t


def from_batch(t, bd, dim):
    if t is None:
        return None
    t = t.movedim(bd, 0) if bd else t
    return t.squeeze(-1) if dim == 2 else t


class Attention(nn.Module):
    """An MHA called as self-, k-is-v cross- or q/k/v cross-attention; returns (out, weights)."""

    def __init__(self, mha, kind, bd, need_weights, average, attn_mask=None):
        super().__init__()
        self.mha, self.kind, self.bd = mha, kind, bd
        self.need_weights, self.average = need_weights, average
        self.attn_mask = attn_mask

    def forward(self, inp):
        q, kv, v, kpm, mask3 = inp
        k = q if self.kind == "self" else kv
        v = k if self.kind in ("self", "kv") else v
        mask = self.attn_mask
        if mask3 is not None:
            mask = from_batch(mask3, self.bd, 4).flatten(0, 1)
        out, w = self.mha(q, k, v, key_padding_mask=from_batch(kpm, self.bd, 2), attn_mask=mask,
                          need_weights=self.need_weights, average_attn_weights=self.average)
        return out, (w if w is None or self.bd == 0 else w.transpose(0, 1))


class Wrapped(nn.Module):
    """A root module taking the carried inputs (masks with the batch at the engine's batch dim)."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, inp):
        return self.fn(self.inner, inp)


def loss_fn(bd):
    dims = lambda t: [d for d in range(t.dim()) if d != bd]  # noqa: E731

    def f(out, target):
        o, w = out
        v = ((o - target) ** 2).sum(dims(o))
        return v if w is None else v + 3.0 * (w**2).sum(dims(w))

    return f


def _mask(kind, shape, gen):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(shape, generator=gen) < 0.4
        m[..., 0] = False  # every query keeps at least one key
        return m
    return torch.randn(shape, generator=gen, dtype=D64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    batch=st.integers(0, 4),
    tgt=st.integers(1, 4),
    src=st.integers(1, 4),
    heads=st.sampled_from([1, 2]),
    head_dim=st.integers(1, 3),
    kind=st.sampled_from(["self", "kv", "qkv", "separate"]),
    batch_first=st.booleans(),
    bias=st.booleans(),
    bias_kv=st.booleans(),
    zero_attn=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    kpm=st.sampled_from([None, "bool", "float"]),
    attn_mask=st.sampled_from([None, "bool", "float", "bool3d", "float3d"]),
    seed=st.integers(0, 2**16),
)
def test_multihead_attention_matches_one_example_at_a_time_reference(
    mode, reduction, batch, tgt, src, heads, head_dim, kind, batch_first, bias, bias_kv,
    zero_attn, need_weights, average, kpm, attn_mask, seed,
):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    E = heads * head_dim
    src = tgt if kind == "self" else src
    kdim, vdim = (E + 1, E + 2) if kind == "separate" else (None, None)
    mha = nn.MultiheadAttention(E, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                kdim=kdim, vdim=vdim, batch_first=batch_first).double()
    bd = 0 if batch_first else 1
    if kpm == "float" and attn_mask in ("bool", "bool3d"):
        attn_mask = "float"  # torch deprecates mixing mask types
    if kpm == "bool" and attn_mask in ("float", "float3d"):
        kpm = "float"
    if batch == 0:  # torch's own MHA cannot reshape an empty per-example mask
        kpm = None
        attn_mask = None if attn_mask in ("bool3d", "float3d") else attn_mask
    key_mask = _mask(kpm, (batch, src), gen)
    mask2 = _mask(attn_mask, (tgt, src), gen) if attn_mask in ("bool", "float") else None
    mask3 = _mask(attn_mask[:-2], (batch, heads, tgt, src), gen) if attn_mask in ("bool3d", "float3d") else None
    model = Attention(mha, kind, bd, need_weights, average, mask2)

    def seq(n, d):
        x = torch.randn(batch, n, d, dtype=D64, generator=gen)
        return x if batch_first else x.transpose(0, 1)

    q = seq(tgt, E)
    inputs = (q, seq(src, kdim or E), seq(src, vdim or E), to_batch(key_mask, bd), to_batch(mask3, bd))
    target = seq(tgt, E)
    with rule_used(exclusive=True) as calls:
        check_against_oracle(model, inputs, target, mode=mode, reduction=reduction,
                             per_example=loss_fn(bd), batch_first=batch_first)
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_kdim_vdim_bias_kv_zero_attn_and_weights_are_exact(mode, batch_first):
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    mha = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, add_bias_kv=True, add_zero_attn=True,
                                batch_first=batch_first).double()
    bd = 0 if batch_first else 1
    B, L, S = 4, 3, 5

    def seq(n, d):
        x = torch.randn(B, n, d, dtype=D64, generator=gen)
        return x if batch_first else x.transpose(0, 1)

    kpm = _mask("bool", (B, S), gen)
    mask3 = _mask("bool", (B, 3, L, S), gen)
    model = Attention(mha, "separate", bd, need_weights=True, average=False)
    inputs = (seq(L, 6), seq(S, 4), seq(S, 5), to_batch(kpm, bd), to_batch(mask3, bd))
    with rule_used(exclusive=True) as calls:
        check_against_oracle(model, inputs, seq(L, 6), mode=mode, per_example=loss_fn(bd),
                             batch_first=batch_first)
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer_with_padding_mask_is_exact(
    mode, reduction, batch_first, norm_first
):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, activation="gelu").double()
    bd = 0 if batch_first else 1
    x = torch.randn(5, 4, 8, dtype=D64)
    kpm = torch.zeros(5, 4, dtype=torch.bool)
    kpm[1, 2:] = True
    kpm[3, 1:] = True
    y = torch.randn(5, 4, 8, dtype=D64)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)

    def call(m, inp):
        return m(inp[0], src_key_padding_mask=from_batch(inp[1], bd, 2))

    with rule_used() as calls:
        check_against_oracle(Wrapped(layer, call), (x, to_batch(kpm, bd)), y, mode=mode,
                             reduction=reduction, batch_first=batch_first,
                             per_example=lambda o, t: ((o - t) ** 2).sum((1 - bd, 2)))
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_layer_with_memory_and_causal_mask_is_exact(
    mode, reduction, batch_first
):
    torch.manual_seed(4)
    layer = nn.TransformerDecoderLayer(6, 3, 10, dropout=0.0, batch_first=batch_first).double()
    bd = 0 if batch_first else 1
    tgt, mem, y = (torch.randn(4, n, 6, dtype=D64) for n in (3, 5, 3))
    mem_kpm = torch.zeros(4, 5, dtype=torch.bool)
    mem_kpm[0, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(3, dtype=D64)
    if not batch_first:
        tgt, mem, y = (t.transpose(0, 1) for t in (tgt, mem, y))

    def call(m, inp):
        return m(inp[0], inp[1], tgt_mask=causal, tgt_is_causal=True,
                 memory_key_padding_mask=from_batch(inp[2], bd, 2))

    with rule_used() as calls:
        check_against_oracle(Wrapped(layer, call), (tgt, mem, to_batch(mem_kpm, bd)), y,
                             mode=mode, reduction=reduction, batch_first=batch_first,
                             per_example=lambda o, t: ((o - t) ** 2).sum((1 - bd, 2)))
    assert len(calls) == 2 or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
def test_full_transformer_is_exact(mode):
    torch.manual_seed(5)
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=8, dropout=0.0, batch_first=True).double()
    src, tgt, y = (torch.randn(3, n, 8, dtype=D64) for n in (4, 2, 2))
    mask = model.generate_square_subsequent_mask(2, dtype=D64)
    with rule_used() as calls:
        check_against_oracle(model, (src, tgt), y, mode=mode,
                             call=lambda m, inp: m(inp[0], inp[1], tgt_mask=mask))
    assert len(calls) == 3 or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_hint_is_exact(mode, need_weights):
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    x, y = torch.randn(3, 5, 4, dtype=D64), torch.randn(3, 5, 4, dtype=D64)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=D64)

    def call(m, inp):
        return m(inp, inp, inp, attn_mask=mask, is_causal=True, need_weights=need_weights)

    with rule_used(exclusive=True) as calls:
        check_against_oracle(mha, x, y, mode=mode, call=call, per_example=loss_fn(0))
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_attention_dropout_matches_stock_forward_and_gradient(mode):
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.3, batch_first=True).double()
    x = torch.randn(4, 5, 8, dtype=D64)
    torch.manual_seed(11)
    ref = layer(x)
    ref.pow(2).sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    with rule_used() as calls, swiftdp.GradClipper(layer, 1e9, mode=mode, loss_reduction="sum"):
        torch.manual_seed(11)
        out = layer(x)
        torch.testing.assert_close(out, ref)  # same dropout masks as the stock module (CPU)
        out.pow(2).sum().backward()
    for p, w in zip(layer.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)  # unclipped: sum of per-example grads
    assert calls


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_dropout_matches_stock(average):
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(6, 2, dropout=0.4, batch_first=True).double()
    x = torch.randn(3, 4, 6, dtype=D64)

    def loss(out):
        return out[0].pow(2).sum() + out[1].pow(3).sum()

    torch.manual_seed(13)
    ref = mha(x, x, x, average_attn_weights=average)
    loss(ref).backward()
    want = [p.grad.clone() for p in mha.parameters()]
    mha.zero_grad(set_to_none=True)
    with rule_used(exclusive=True), swiftdp.GradClipper(mha, 1e9, loss_reduction="sum"):
        torch.manual_seed(13)
        out = mha(x, x, x, average_attn_weights=average)
        torch.testing.assert_close(out, ref)
        loss(out).backward()
    for p, w in zip(mha.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)


class StaticKeys(nn.Module):
    """The functional form called directly, with per-example static keys and values."""

    def __init__(self):
        super().__init__()
        self.inner = nn.MultiheadAttention(4, 2).double()

    def forward(self, inp):
        x, sk, sv = inp  # static keys/values carried as (S, B, H, hd)
        B = x.shape[1]
        sk, sv = (s.permute(1, 2, 0, 3).reshape(B * 2, -1, 2) for s in (sk, sv))
        m = self.inner
        return F.multi_head_attention_forward(
            x, x, x, 4, 2, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
            m.out_proj.weight, m.out_proj.bias, need_weights=False, static_k=sk, static_v=sv,
        )[0]


@pytest.mark.parametrize("mode", MODES)
def test_static_keys_and_values_are_exact(mode):
    torch.manual_seed(9)
    x, y = torch.randn(3, 5, 4, dtype=D64), torch.randn(3, 5, 4, dtype=D64)
    sk, sv = torch.randn(6, 5, 2, 2, dtype=D64), torch.randn(6, 5, 2, 2, dtype=D64)
    with rule_used(exclusive=True) as calls:
        check_against_oracle(StaticKeys(), (x, sk, sv), y, mode=mode, batch_first=False,
                             per_example=lambda o, t: ((o - t) ** 2).sum((0, 2)))
    assert calls or mode == "nanobatch"


def test_unbatched_query_is_refused():
    mha = nn.MultiheadAttention(4, 2).double()

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x[0], x[0], x[0])[0]

    model = Unbatched()
    with swiftdp.GradClipper(model, 1.0), pytest.raises(UnsupportedModuleError, match="mha"):
        model(torch.randn(2, 3, 4, dtype=D64))
