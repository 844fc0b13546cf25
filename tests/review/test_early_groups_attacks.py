"""Review attacks: group-wise clipping inside the backward, the probe's backward check, secure noise.

Each test asserts the safe behaviour; found leaks / deviations are strict xfails
with the measured figure. Float64 throughout unless stated.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import swiftdp
from swiftdp.clipping.guard import IndependenceCheck
from swiftdp.errors import UnsupportedModuleError
from swiftdp.optim import noise as noise_mod

G3 = {"0": 0.03, "2": 0.04, "4": 0.05}
BOUND3 = math.sqrt(sum(c * c for c in G3.values()))


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out[0] if isinstance(out, tuple) else out, y, reduction="sum")


def _engine(model, xs, ys, groups, mode="bk", early=True, lossf=_ce, **kw) -> list[Tensor]:
    for p in model.parameters():
        p.grad = None
    c = swiftdp.GradClipper(model, groups, mode=mode, loss_reduction="sum", **kw)
    c.clip_groups_in_backward = early
    try:
        lossf(model(xs), ys).backward()
    finally:
        c.remove()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters() if p.requires_grad]


def _reference(model, xs, ys, groups, lossf=_ce) -> list[Tensor]:
    names = list(groups)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    member = [next(k for k, g in enumerate(names) if n == g or n.startswith(g + "."))
              for n, _ in named]
    ps = [p for _, p in named]
    sums = [torch.zeros_like(p) for p in ps]
    for i in range(len(xs)):
        for p in ps:
            p.grad = None
        lossf(model(xs[i:i + 1]), ys[i:i + 1]).backward()  # .backward: reentrant checkpoints
        gs = [torch.zeros_like(p) if p.grad is None else p.grad for p in ps]
        for k, g in enumerate(names):
            n = math.sqrt(sum(float((gr.double() ** 2).sum())
                              for gr, m in zip(gs, member, strict=True) if m == k))
            f = min(1.0, groups[g] / (n + 1e-6))
            for s, gr, m in zip(sums, gs, member, strict=True):
                if m == k:
                    s.add_(gr, alpha=f)
    for p in ps:
        p.grad = None
    return sums


def _rel(a: list[Tensor], b: list[Tensor]) -> float:
    num = math.sqrt(sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b, strict=True)))
    return num / (math.sqrt(sum(float((y.double() ** 2).sum()) for y in b)) + 1e-30)


def _sens(run, xs, ys) -> float:
    full, best = run(xs, ys), 0.0
    for j in range(len(ys)):
        keep = [i for i in range(len(ys)) if i != j]
        s = run(xs[keep], ys[keep])
        best = max(best, math.sqrt(sum(float(((a - b).double() ** 2).sum())
                                       for a, b in zip(full, s, strict=True))))
    return best


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


# ------------------------------------------------------------------ models
class Twice(nn.Module):  # one Linear called twice; the first call's gradient arrives last
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.head, self.aux = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h1 = self.a(x)
        h2 = self.a(torch.tanh(self.b(torch.tanh(h1))))
        return self.head(torch.tanh(h2)) + self.aux(torch.tanh(h1))


class Slice(nn.Module):  # a slice of a weight used again
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h) + F.linear(h[:, :5], self.a.weight[:3, :5])


class Generic(nn.Module):  # custom math on weights (generic fallback)
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 5)
        self.w = nn.Parameter(torch.randn(5, 5) * 0.3)
        self.scale = nn.Parameter(torch.ones(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(torch.tanh(self.pre(x)) @ (self.w * self.scale).T))


class Ckpt(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


class Unused(nn.Module):  # an output the loss never reaches
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.side = nn.Linear(5, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.a(x))
        return self.b(h), self.side(h)


class Rnn(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.rnn = kind(4, 5, batch_first=True, num_layers=2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


class WeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(5, 5))
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class PosAttention(nn.Module):  # expand-rule position embedding + MHA
    def __init__(self, cls: bool = False) -> None:
        super().__init__()
        self.use_cls = cls
        self.inp = nn.Linear(5, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(4 if cls else 3, 4) * 0.1)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.cls.requires_grad_(cls)

    def forward(self, x: Tensor) -> Tensor:
        t = self.inp(x).view(x.shape[0], 1, 4).expand(-1, 3, -1) * torch.arange(1, 4.0).view(1, 3, 1)
        if self.use_cls:
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
        t = t + self.pos
        return self.head(self.att(t, t, t)[0][:, 0])


class Compiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.mid = torch.compile(nn.Sequential(nn.Linear(6, 6), nn.Tanh()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mid(torch.tanh(self.a(x))))


class TiedEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.mid = nn.Embedding(9, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.tok(x)))).mean(1)[:, :3]


def _floats() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def _tokens() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 9, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)


CASES = {
    "module-called-twice": (Twice, _floats, None),
    "weight-slice": (Slice, _floats, None),
    "generic-rule": (Generic, _floats, {"pre": 0.05, "w": 0.03, "scale": 0.02, "head": 0.04}),
    "checkpoint-reentrant": (lambda: Ckpt(True), _floats, None),
    "checkpoint-non-reentrant": (lambda: Ckpt(False), _floats, None),
    "unused-output": (Unused, _floats, None),
    "lstm": (lambda: Rnn(nn.LSTM), _tokens, None),
    "gru": (lambda: Rnn(nn.GRU), _tokens, None),
    "weight-norm": (WeightNorm, _floats, None),
    "pos-embedding-mha": (PosAttention, _floats, None),
    "tied-embedding": (TiedEmb, _tokens, {"tok": 0.03, "mid": 0.04}),
}


# ------------------------------------------------- 1. early group clipping
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("case", list(CASES))
def test_early_equals_end_of_backward_and_reference(case, mode):
    build, data, groups = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = data()
    groups = groups or swiftdp.per_layer_thresholds(model, 0.05)
    early = _engine(model, xs, ys, groups, mode, True)
    late = _engine(model, xs, ys, groups, mode, False)
    ref = _reference(model, xs, ys, groups)
    assert _rel(early, late) < 1e-12  # measured 0.0 on every case
    assert _rel(early, ref) < 1e-10   # measured ≤ 4.3e-15


def test_compiled_submodule_early_equals_reference():
    torch.manual_seed(0)
    model = Compiled().double()
    xs, ys = _floats()
    groups = {"a": 0.03, "mid": 0.04, "head": 0.05}
    early = _engine(model, xs, ys, groups, "bk", True)
    assert _rel(early, _engine(model, xs, ys, groups, "bk", False)) < 1e-12
    assert _rel(early, _reference(model, xs, ys, groups)) < 1e-10


@pytest.mark.parametrize("case", ["module-called-twice", "lstm", "checkpoint-reentrant"])
def test_early_sensitivity_at_most_root_sum_of_squares(case):
    build, data, groups = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = data()
    if xs.is_floating_point():
        xs = xs * 20.0
    groups = groups or swiftdp.per_layer_thresholds(model, 0.05)
    bound = math.sqrt(sum(c * c for c in groups.values()))
    sens = _sens(lambda a, b: _engine(model, a, b, groups, "bk", True), xs, ys)
    assert sens <= bound * (1 + 1e-9)  # measured 1.0000 / 0.8687 / 1.0000 of the bound


@pytest.mark.xfail(strict=True, reason="false refusal (pre-existing, not early-specific): a cls "
                   "token p.expand(B,...) + torch.cat fed to nn.MultiheadAttention(batch_first=True) "
                   "is refused in early and end-of-backward modes ('combines a parameter broadcast "
                   "to the batch'); without the cls token the same model is exact")
def test_cls_token_with_attention_is_accepted():
    torch.manual_seed(0)
    model = PosAttention(cls=True).double()
    xs, ys = _floats()
    groups = swiftdp.per_layer_thresholds(model, 0.05)
    early = _engine(model, xs, ys, groups, "bk", True)
    assert _rel(early, _reference(model, xs, ys, groups)) < 1e-10


def test_two_forwards_one_backward_and_retain_graph():
    xs, ys = _floats()

    def two(early: bool) -> list[Tensor]:
        m = _mlp()
        c = swiftdp.GradClipper(m, G3, loss_reduction="sum")
        c.clip_groups_in_backward = early
        try:
            (_ce(m(xs), ys) + _ce(m(2 * xs), ys)).backward()
        finally:
            c.remove()
        return [p.grad for p in m.parameters()]

    assert _rel(two(True), two(False)) < 1e-12

    def twice(early: bool) -> list[list[Tensor]]:
        m, res = _mlp(), []
        c = swiftdp.GradClipper(m, G3, loss_reduction="sum",
                                sink=lambda r: res.append([s.clone() for _, s in r.sums]))
        c.clip_groups_in_backward = early
        try:
            loss = _ce(m(xs), ys)
            loss.backward(retain_graph=True)
            loss.backward()
        finally:
            c.remove()
        return res

    a, b = twice(True), twice(False)
    assert len(a) == 2 and _rel(a[0], b[0]) < 1e-12 and _rel(a[1], b[1]) < 1e-12
    assert _rel(a[0], a[1]) < 1e-12


def test_augmult_early_exact_and_bounded():
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(5, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)

    def loss(o: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(o.mean(1), y, reduction="sum")

    model = _mlp()
    run = lambda a, b, e=True: _engine(model, a, b, G3, "bk", e, loss, augmult=3)  # noqa: E731
    early = run(xs, ys)
    assert _rel(early, run(xs, ys, False)) < 1e-12
    assert _rel(early, _reference(model, xs, ys, G3, loss)) < 1e-10
    assert _sens(run, xs * 20, ys) <= BOUND3 * (1 + 1e-9)  # measured 0.99999 of the bound


def test_bf16_autocast_sum_loss_bounded():
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    model = _mlp().float()

    def run(a: Tensor, b: Tensor, early: bool = True) -> list[Tensor]:
        for p in model.parameters():
            p.grad = None
        c = swiftdp.GradClipper(model, G3, loss_reduction="sum")
        c.clip_groups_in_backward = early
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(a)
            F.cross_entropy(out.float(), b, reduction="sum").backward()
        finally:
            c.remove()
        return [p.grad.double().clone() for p in model.parameters()]

    assert _rel(run(xs, ys), run(xs, ys, False)) == 0.0
    assert _sens(run, xs * 20, ys) <= BOUND3 * (1 + 1e-5)  # measured 0.999998 of the bound


class _InfRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, rows):
        ctx.save_for_backward(rows)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, gr):
        (rows,) = ctx.saved_tensors
        return torch.where(rows, gr * math.inf, gr), None


def _nonfinite(early: bool, xs: Tensor, ys: Tensor, bad: int = 2) -> list[Tensor]:
    m = _mlp()
    c = swiftdp.GradClipper(m, G3, loss_reduction="sum")
    c.clip_groups_in_backward = early
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = m[1](m[0](xs))
            rows = torch.arange(len(xs)).view(-1, 1) == (bad if bad < len(xs) else -1)
            # example `bad`'s gradient is inf in the first layer's group only (a function
            # in the graph: a tensor hook on an output may no longer change its gradient)
            h = _InfRows.apply(h, rows)
            _ce(m[4](m[3](m[2](h))), ys).backward()
    finally:
        c.remove()
    return [p.grad.clone() for p in m.parameters()]


def test_nonfinite_example_in_one_group_stays_bounded():
    xs, ys = _floats()
    full = _nonfinite(True, xs * 20, ys)
    assert all(bool(torch.isfinite(g).all()) for g in full)
    keep = [i for i in range(6) if i != 2]
    moved = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in
                          zip(full, _nonfinite(True, xs[keep] * 20, ys[keep], bad=99), strict=True)))
    assert moved <= BOUND3 * (1 + 1e-9)


@pytest.mark.xfail(strict=True, reason="deviation, not a leak: an example non-finite in one group "
                   "is dropped from that group only when clipping in the backward (early.py "
                   "_clip), but from all groups at the end (step.py _clip): measured rel. "
                   "difference 0.43 between the two clipped sums")
def test_nonfinite_early_equals_end_of_backward():
    xs, ys = _floats()
    assert _rel(_nonfinite(True, xs, ys), _nonfinite(False, xs, ys)) < 1e-12


def test_threshold_change_before_late_group_refused():
    m = _mlp()
    xs, ys = _floats()
    c = swiftdp.GradClipper(m, dict(G3), loss_reduction="sum")
    try:
        h = m[1](m[0](xs))
        h.register_hook(lambda g: c.set_max_grad_norm({"0": 5.0, "2": 0.04, "4": 0.05}))
        with pytest.raises(UnsupportedModuleError, match="thresholds changed"):
            _ce(m[4](m[3](m[2](h))), ys).backward()
    finally:
        c.remove()


# --------------------------------------------- 2. the probe's backward check
def _st(h: Tensor) -> Tensor:  # forward unchanged, backward moves gradient across rows
    r = h.roll(1, 0)
    return h + (r - r.detach())


class TokenST(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_st(torch.tanh(self.emb(x)).mean(1)))


class SideST(nn.Module):  # float input, but the mixing is on the token branch
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(9, 4), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x)) + _st(self.emb(ids).mean(1)))


class ParamBranchST(nn.Module):  # mixing on a branch that does not depend on the input
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h * _st(self.b(torch.ones_like(h))))


def _probe_sens(build, args: tuple[Tensor, ...], ys: Tensor) -> float:
    """Sensitivity (C = 1) with the independence probe attached; raises if it refuses."""
    torch.manual_seed(0)
    model = build().double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)

    def run(*a: Tensor) -> list[Tensor]:
        for p in model.parameters():
            p.grad = None
        c = swiftdp.GradClipper(model, 1.0, loss_reduction="sum")
        chk = IndependenceCheck(model, c)
        try:
            _ce(model(*a[:-1]), a[-1]).backward()
        finally:
            chk.remove()
            c.remove()
        return [p.grad.clone() for p in model.parameters()]

    full, best = run(*args, ys), 0.0
    for j in range(len(ys)):
        keep = [i for i in range(len(ys)) if i != j]
        s = run(*[a[keep] for a in args], ys[keep])
        best = max(best, math.sqrt(sum(float(((u - v) ** 2).sum()) for u, v in zip(full, s, strict=True))))
    return best


def _refused_or_bounded(build, args, ys) -> None:
    try:
        sens = _probe_sens(build, args, ys)
    except swiftdp.errors.ExampleMixingError:
        return
    assert sens <= 1.0 + 1e-9, f"accepted, sensitivity {sens:.3f} C"


def test_probe_token_only_straight_through():
    xt, ys = _tokens()
    _refused_or_bounded(TokenST, (xt,), ys)


def test_probe_mixing_on_token_branch_of_float_model():
    (xs, ys), (xt, _) = _floats(), _tokens()
    _refused_or_bounded(SideST, (xs * 10, xt), ys)


def test_probe_mixing_on_input_independent_branch():
    xs, ys = _floats()
    _refused_or_bounded(ParamBranchST, (xs * 10,), ys)


# Was a leak (a hook on an activation registered from step 2 on, accepted): the tracer now
# wraps hooks registered on batch-carrying tensors during the forward (read-only).
def test_probe_activation_hook_added_on_a_later_step():
    flag = {"on": False}

    class Later(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(x))
            if flag["on"] and h.requires_grad:
                h.register_hook(lambda g: g + 3 * g.roll(1, 0))
            return self.head(h)

    xs, ys = _floats()
    m = Later().double()
    c = swiftdp.GradClipper(m, 1.0, loss_reduction="sum")
    chk = IndependenceCheck(m, c)
    try:
        _ce(m(xs), ys).backward()
        flag["on"] = True
        with pytest.raises((swiftdp.errors.ExampleMixingError, UnsupportedModuleError)):
            _ce(m(xs), ys).backward()
    finally:
        chk.remove()
        c.remove()


def test_probe_accepts_stock_layers():
    class Stock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.gn = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4)
            self.ln, self.drop = nn.LayerNorm(4), nn.Dropout(0.3)
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.lstm, self.emb = nn.LSTM(4, 4, batch_first=True), nn.Embedding(9, 4)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                4, 2, 8, dropout=0.1, batch_first=True), 1, enable_nested_tensor=False)
            self.head = nn.Linear(4, 3)

        def forward(self, x, ids, w, mask):
            h = self.gn(self.conv(x)).flatten(2).transpose(1, 2)
            h = self.ln(h) + self.emb(ids[:, :1]) * w[:, None, None]
            o = self.att(h, h, h, key_padding_mask=mask)[0]
            o = self.enc(o, src_key_padding_mask=mask)
            return self.head(self.lstm(self.drop(o))[0][:, -1])

    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(6, 25, dtype=torch.bool)
    mask[:, -3:] = True
    args = (torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 9, (6, 4), generator=g),
            torch.rand(6, generator=g), mask)
    m = Stock().train()
    c = swiftdp.GradClipper(m, 1.0, loss_reduction="sum")
    chk = IndependenceCheck(m, c)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m(*args).sum().backward()  # not refused
    finally:
        chk.remove()
        c.remove()


# ----------------------------------------------------------- 3. secure noise
def test_secure_noise_distribution_and_no_reuse():
    z = noise_mod.secure_standard_normal(400_000).numpy()
    assert abs(z.mean()) < 5 * 0.0016 and abs(z.var() - 1) < 0.015
    assert abs((z ** 4).mean() - 3) < 0.08  # kurtosis of a Gaussian
    assert abs((np.abs(z) > 3).mean() - 0.0026998) < 0.0008
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    assert not torch.equal(noise_mod.secure_standard_normal(8), noise_mod.secure_standard_normal(8))
    gen, seed = noise_mod.make_noise_generator(0, secure=True)
    assert seed is None

    class Acc:
        def __init__(self, dtype: torch.dtype) -> None:
            self.grad = torch.zeros(50_000, dtype=dtype)
            self.shape = self.grad.shape

    for dt in (torch.float32, torch.bfloat16, torch.float64):
        a, b = Acc(dt), Acc(dt)
        noise_mod.add_gaussian_noise([a, b], 2.0, gen)
        x, y = a.grad.double(), b.grad.double()
        assert not torch.equal(x, y)
        assert abs(float(x.var()) / 4 - 1) < 0.05 and abs(float(x.mean())) < 0.05


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_secure_noise_extreme_entropy_is_finite(monkeypatch, byte):
    monkeypatch.setattr(os, "urandom", lambda n: bytes([byte]) * n)
    assert bool(torch.isfinite(noise_mod.secure_standard_normal(5)).all())


def test_uniform_construction_open_interval(monkeypatch):
    """Extreme entropy bytes: uniforms strictly inside (0, 1), so no radius is 0 or infinite."""
    import swiftdp.optim.noise as noise_module

    for byte in (b"\xff", b"\x00"):
        monkeypatch.setattr(noise_module.os, "urandom", lambda n, b=byte: b * n)
        z = noise_module.secure_standard_normal(8, summands=1)
        assert bool(torch.isfinite(z).all()) and bool((z != 0).any())
