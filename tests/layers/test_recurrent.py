"""Stock nn.LSTM / nn.GRU / nn.RNN against the one-at-a-time oracle."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import swiftdp
from support.harness import MODES, REDUCTIONS, check_against_oracle
from support.sensitivity import neighbour_sensitivity
from swiftdp.clipping import generic
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers import RULES

D64 = torch.float64
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
FUSED = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread avoids thread-pool stalls on loaded CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def rule_used():
    """Count calls of the recurrent rule; any generic (torch.func) fallback fails the test."""
    calls: list[int] = []
    saved = {f: RULES[f] for f in FUSED}
    capture = generic.capture_module_output

    def spy(tr, func, args, kwargs):
        calls.append(1)
        return saved[func](tr, func, args, kwargs)

    def boom(engine, call, output):
        raise AssertionError(f"generic rule used for {call.path}")

    for f in FUSED:
        RULES[f] = spy
    generic.capture_module_output = boom
    try:
        yield calls
    finally:
        RULES.update(saved)
        generic.capture_module_output = capture


def make_rnn(cell, inp, hidden, **kw):
    if cell == "lstm":
        return nn.LSTM(inp, hidden, **kw).double()
    kw.pop("proj_size", None)
    if cell == "gru":
        return nn.GRU(inp, hidden, **kw).double()
    return nn.RNN(inp, hidden, nonlinearity=cell[4:], **kw).double()


class Recurrent(nn.Module):
    """Returns (output, h_n[, c_n]) with the batch at ``bd``; takes an optional initial state."""

    def __init__(self, rnn, bd):
        super().__init__()
        self.rnn, self.bd = rnn, bd

    def forward(self, inp):
        x, *state = inp
        hx = None
        if state:  # carried with the batch at bd, as (L·D, B, ·) inside
            hx = tuple(s.transpose(0, 1) if self.bd == 0 else s for s in state)
            hx = hx if isinstance(self.rnn, nn.LSTM) else hx[0]
        out, h = self.rnn(x, hx)
        states = h if isinstance(h, tuple) else (h,)
        return (out, *(s.transpose(0, 1) if self.bd == 0 else s for s in states))


def loss_fn(bd):
    def f(outs, target):
        out, *states = outs
        dims = [d for d in range(out.dim()) if d != bd]
        v = ((out - target) ** 2).sum(dims)
        for k, s in enumerate(states):  # loss on h_n and c_n too
            v = v + (k + 1.5) * (s.sin() ** 2).sum(dims)
        return v

    return f


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    cell=st.sampled_from(CELLS),
    batch=st.integers(0, 4),
    seq=st.integers(1, 4),
    inp=st.integers(1, 3),
    hidden=st.integers(1, 4),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    proj=st.booleans(),
    init=st.sampled_from([None, "given", "requires_grad"]),
    seed=st.integers(0, 2**16),
)
def test_recurrent_matches_one_example_at_a_time_reference(
    mode, reduction, cell, batch, seq, inp, hidden, layers, bidirectional, batch_first, bias,
    proj, init, seed,
):
    torch.manual_seed(seed)
    proj_size = hidden - 1 if proj and cell == "lstm" and hidden > 1 else 0
    rnn = make_rnn(cell, inp, hidden, num_layers=layers, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias, proj_size=proj_size)
    bd = 0 if batch_first else 1
    D = 2 if bidirectional else 1
    out_size = (proj_size or hidden) * D

    def seq_tensor(width):
        t = torch.randn(batch, seq, width, dtype=D64)
        return t if batch_first else t.transpose(0, 1)

    inputs = [seq_tensor(inp)]
    if init is not None:
        sizes = [proj_size or hidden] + ([hidden] if cell == "lstm" else [])
        for s in sizes:
            h = torch.randn(batch, layers * D, s, dtype=D64)
            h = h if batch_first else h.transpose(0, 1)
            inputs.append(h.requires_grad_(init == "requires_grad"))
    with rule_used() as calls:
        check_against_oracle(Recurrent(rnn, bd), tuple(inputs), seq_tensor(out_size), mode=mode,
                             reduction=reduction, per_example=loss_fn(bd), batch_first=batch_first)
    assert calls or mode == "nanobatch"


NAMED = {
    "lstm_2_layers_bidirectional": ("lstm", {"num_layers": 2, "bidirectional": True}),
    "gru": ("gru", {}),
    "rnn_relu_time_major": ("rnn_relu", {"batch_first": False}),
    "lstm_proj_size": ("lstm", {"proj_size": 2, "num_layers": 2}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_configurations_are_exact(mode, name):
    torch.manual_seed(10)
    cell, kw = NAMED[name]
    kw = {"batch_first": True, **kw}
    rnn = make_rnn(cell, 3, 4, **kw)
    bd = 0 if kw["batch_first"] else 1
    width = kw.get("proj_size", 4) * (2 if kw.get("bidirectional") else 1)
    shape = (5, 6) if bd == 0 else (6, 5)
    x, y = torch.randn(*shape, 3, dtype=D64), torch.randn(*shape, width, dtype=D64)
    with rule_used() as calls:
        check_against_oracle(Recurrent(rnn, bd), (x,), y, mode=mode, per_example=loss_fn(bd),
                             batch_first=kw["batch_first"])
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_lstm_with_tiny_preactivations_keeps_relative_accuracy(mode):
    """Weights of 1e-9: the tanh gates and cell states are ~1e-9, so forming
    ``tanh x`` as ``2σ(2x) − 1`` would lose ~u/|x| ≈ 1e-7 of relative accuracy in
    the factors of ``w_hr`` and the ``o`` gate; ``tanh`` keeps
    them within float64 rounding (the sigmoid form: 4.7e-7 on the clipped sum)."""
    torch.manual_seed(3)
    rnn = make_rnn("lstm", 3, 4, batch_first=True, proj_size=2, bias=False)
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(1e-9)
    x, y = torch.randn(5, 6, 3, dtype=D64), torch.randn(5, 6, 2, dtype=D64)
    with rule_used() as calls:
        check_against_oracle(Recurrent(rnn, 0), (x,), y, mode=mode, per_example=loss_fn(0),
                             max_grad_norm=1e6, tol=1e-10)
    assert calls


class Packed(nn.Module):
    """Packs padded, unsorted sequences by their lengths; returns padded outputs and h_n."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size if not getattr(rnn, "proj_size", 0) else rnn.proj_size
        self.head = nn.Linear(width * (2 if rnn.bidirectional else 1), 2).double()

    def forward(self, inp):
        x, lengths = inp
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out), h.transpose(0, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    cell=st.sampled_from(CELLS),
    batch=st.integers(1, 4),  # pack_padded_sequence refuses an empty batch
    seq=st.integers(1, 4),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    proj=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_sequences_of_unsorted_lengths_are_exact(
    mode, reduction, cell, batch, seq, layers, bidirectional, proj, seed
):
    torch.manual_seed(seed)
    rnn = make_rnn(cell, 3, 3, num_layers=layers, bidirectional=bidirectional,
                   proj_size=2 if proj else 0)
    x = torch.randn(batch, seq, 3, dtype=D64)
    lengths = torch.randint(1, seq + 1, (batch,))
    y = torch.randn(batch, seq, 2, dtype=D64)
    with rule_used() as calls:
        check_against_oracle(Packed(rnn), (x, lengths), y, mode=mode, reduction=reduction,
                             per_example=loss_fn(0))
    assert calls or mode == "nanobatch"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_clipped_sum_moves_by_at_most_c_when_one_example_is_removed(mode, packed):
    """The privacy bound itself: max_j ‖S(D) − S(D∖j)‖ <= C for a 2-layer
    bidirectional LSTM with projections (loss on the outputs, h_n and c_n), padded
    or packed with unsorted lengths; every example's gradient is far above C, so
    the bound is met with equality (the probe is not vacuous)."""
    torch.manual_seed(5)
    C = 0.05
    rnn = make_rnn("lstm", 3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    model = Packed(rnn) if packed else Recurrent(rnn, 0)
    x = torch.randn(5, 6, 3, dtype=D64)
    lengths = torch.tensor([6, 2, 5, 1, 4])
    y = torch.randn(5, 6, 2 if packed else 4, dtype=D64)
    loss = loss_fn(0)

    def clipped_sum(batch):
        *inputs, target = batch
        for p in model.parameters():
            p.grad = None
        clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
        try:
            loss(model(tuple(inputs)), target).sum().backward()
        finally:
            clipper.remove()
        return [p.grad.clone() for p in model.parameters()]

    batch = (x, lengths, y) if packed else (x, y)
    with rule_used() as calls:
        s = neighbour_sensitivity(clipped_sum, batch, 5)
    assert C * (1 - 1e-6) <= s <= C * (1 + 1e-9)
    assert calls or mode == "nanobatch"


class Classifier(nn.Module):
    """Embedding → 2-layer bidirectional LSTM → linear on the last layer's final state."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens):
        _, (h, _) = self.lstm(self.emb(tokens))
        return self.out(h[-1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lstm_classifier_on_final_state_is_exact(mode, reduction):
    torch.manual_seed(8)
    model = Classifier().double()
    tokens = torch.randint(0, 11, (6, 7))
    labels = torch.randint(0, 3, (6,))
    check_against_oracle(model, tokens, labels, mode=mode, reduction=reduction,
                         per_example=lambda o, t: F.cross_entropy(o, t, reduction="none"))


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_between_layers_matches_stock_forward_and_gradient(mode, cell, packed):
    torch.manual_seed(9)
    rnn = make_rnn(cell, 3, 4, num_layers=3, dropout=0.4, bidirectional=True, batch_first=True)
    model = Packed(rnn) if packed else Recurrent(rnn, 0)
    x = torch.randn(5, 6, 3, dtype=D64)
    inp = (x, torch.tensor([3, 6, 1, 6, 2])) if packed else (x,)
    torch.manual_seed(12)
    ref = model(inp)
    sum(o.pow(2).sum() for o in ref).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with rule_used() as calls, swiftdp.GradClipper(model, 1e9, mode=mode, loss_reduction="sum"):
        torch.manual_seed(12)
        got = model(inp)
        for o, r in zip(got, ref, strict=True):
            torch.testing.assert_close(o, r)  # the stock dropout masks (CPU random stream)
        sum(o.pow(2).sum() for o in got).backward()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)  # unclipped: the sum of per-example gradients
    assert calls


def test_batch_on_the_wrong_dimension_is_refused():
    model = Recurrent(nn.LSTM(3, 4).double(), 0)  # time-major module, batch-major engine
    with swiftdp.GradClipper(model, 1.0), pytest.raises(UnsupportedModuleError, match="rnn"):
        model((torch.randn(5, 7, 3, dtype=D64),))
