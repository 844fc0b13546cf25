"""Per-example norms cannot be fooled: cancellation and non-finite examples.

Contracts, checked against an independent one-example-at-a-time float64
reference (plain autograd) and against the neighbour sensitivity
``max_j ‖S(D) − S(D∖j)‖ ≤ C``, ``S`` the clipped sum swiftdp leaves in
``p.grad`` with ``loss_reduction="sum"``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import swiftdp
from support.oracle import reference_clipped_sum
from swiftdp.clipping.clip_fns import clip_factors
from swiftdp.clipping.contributions import (
    LinearFactors,
    PerSampleGrads,
    param_sq_norms,
    param_weighted_sum,
)
from swiftdp.errors import NonFiniteGradientWarning
from swiftdp.layers.conv import ConvFactors, make_spec
from swiftdp.layers.embedding import NORM_METHODS, EmbeddingGrads

C = 1.0
SLACK = 1.0 + 1e-5
MODES = ("bk", "ghost", "per_sample")


def _clipped_sum(model: nn.Module, loss_fn, x: Tensor, y: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """swiftdp's clipped sum (all trainable parameters, flattened) and per-example norms."""
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
    try:
        loss_fn(model(x), y).backward()
    finally:
        clipper.remove()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    assert clipper.last_norms is not None
    return flat.double(), clipper.last_norms


def _neighbour_sensitivity(model, loss_fn, x, y, mode) -> float:
    full, _ = _clipped_sum(model, loss_fn, x, y, mode)
    worst = 0.0
    for j in range(x.shape[0]):
        keep = [i for i in range(x.shape[0]) if i != j]
        part, _ = _clipped_sum(model, loss_fn, x[keep], y[keep], mode)
        worst = max(worst, (full - part).norm().item())
    return worst


def _dot_loss(out: Tensor, y: Tensor) -> Tensor:
    """A linear loss: the output gradient is exactly ``y`` (an attacker picks it via the label)."""
    return (out * y).sum()


def _naive_float32_ghost_norm(a: Tensor, g: Tensor) -> float:
    """The unguarded float32 ghost norm ``√⟨a aᵀ, g gᵀ⟩`` of one example ``(T, d)``, ``(T, p)``."""
    sq = ((a @ a.T) * (g @ g.T)).sum().item()
    return math.sqrt(max(sq, 0.0))


# ------------------------------------------------------------------ cancellation
def _cancelling_linear_batch() -> tuple[Tensor, Tensor]:
    """Example 0 feeds one large input twice with opposite output gradients (+ a small δ)."""
    torch.manual_seed(0)
    B, T, d, p = 4, 2, 16, 16
    x = 0.3 * torch.randn(B, T, d)
    y = 0.3 * torch.randn(B, T, p)
    a = torch.full((d,), 2500.0)  # ‖a‖ = 1e4
    g = torch.zeros(p)
    g[0] = 1000.0
    delta = torch.zeros(p)
    delta[1] = 0.05  # true ‖G_0‖ = ‖δ‖‖a‖ = 500
    x[0, 0], x[0, 1] = a, a
    y[0, 0], y[0, 1] = g, -g + delta
    return x, y


@pytest.mark.parametrize("mode", [*MODES, "nanobatch"])
def test_crafted_cancelling_linear_input_is_clipped_to_c(mode):
    x, y = _cancelling_linear_batch()
    model = nn.Linear(16, 16)
    # the input is adversarial: the float32 ghost norm sees ~0 where the truth is 500 C
    _, true_norms = reference_clipped_sum(
        copy.deepcopy(model).double(), _dot_loss, x.double(), y.double(), C)
    assert true_norms[0] > 400 * C
    assert _naive_float32_ghost_norm(x[0], y[0]) < C
    assert _neighbour_sensitivity(model, _dot_loss, x, y, mode) <= C * SLACK
    _, norms = _clipped_sum(model, _dot_loss, x, y, mode)
    assert norms[0] >= true_norms[0] * (1 - 1e-6)


@pytest.mark.parametrize("mode", [*MODES, "nanobatch"])
def test_crafted_repeated_tokens_with_opposite_gradients_are_clipped_to_c(mode):
    torch.manual_seed(1)
    B, T, V, d = 4, 2, 10, 16
    x = torch.randint(0, V, (B, T))
    y = 0.3 * torch.randn(B, T, d)
    g = torch.zeros(d)
    g[0] = 1e6
    delta = torch.zeros(d)
    delta[1] = 50.0  # true ‖G_0‖ = 50
    x[0] = 5
    y[0, 0], y[0, 1] = g, -g + delta
    model = nn.Embedding(V, d)
    _, true_norms = reference_clipped_sum(copy.deepcopy(model).double(), _dot_loss, x, y.double(), C)
    assert true_norms[0] > 40 * C
    same = (x[0].unsqueeze(1) == x[0].unsqueeze(0)).float()
    naive = (same * (y[0] @ y[0].T)).sum().item()  # the unguarded float32 pairwise norm²
    assert math.sqrt(max(naive, 0.0)) < C
    assert _neighbour_sensitivity(model, _dot_loss, x, y, mode) <= C * SLACK
    _, norms = _clipped_sum(model, _dot_loss, x, y, mode)
    assert norms[0] >= true_norms[0] * (1 - 1e-6)


def _one_example_cases() -> list[tuple[str, object]]:
    """Uses of one example whose exact gradient nearly cancels, with inputs in several dtypes.

    The same input row at every position, output gradients of alternating
    signs plus a perturbation of a few units in the last place: the exact
    gradient is small, the terms are large.
    """
    cases: list[tuple[str, object]] = []
    gen = torch.Generator().manual_seed(2)
    T, d, p, V = 64, 8, 8, 6
    signs = torch.tensor([1.0, -1.0]).repeat(T // 2).view(1, T, 1)
    tok = torch.full((1, T), 3)
    tok[0, ::5] = 1
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        eps, scale = torch.finfo(dt).eps, (1.0 if dt == torch.float16 else 1e3)
        a0 = scale * torch.randn(1, 1, d, generator=gen)
        g0 = scale * torch.randn(1, 1, p, generator=gen)
        a = (a0 * (1 + eps * torch.randn(1, T, d, generator=gen))).to(dt)
        g = (signs * g0 + 4 * eps * g0.abs() * torch.randn(1, T, p, generator=gen)).to(dt)
        param = torch.zeros(p, d)
        for ghost in (True, False):
            cases.append((f"linear-{dt}-ghost={ghost}", LinearFactors(param, a, g, ghost=ghost)))
        table = torch.zeros(V, p)
        for method in NORM_METHODS:
            cases.append((f"embedding-{dt}-{method}", EmbeddingGrads(table, tok, g, method=method)))
    weight = torch.zeros(3, 2, 3, 3)
    x = 1e3 * (1 + 1e-7 * torch.randn(1, 2, 6, 6, generator=gen))  # near-constant patches
    gc = torch.randn(1, 3, 4, 4, generator=gen)
    gc = gc - gc.mean((2, 3), keepdim=True)  # positions cancel
    spec, xe = make_spec(x, (3, 3), 1, 0, 1, 1)
    for ghost, keep in ((True, False), (False, False), (False, True)):
        cases.append((f"conv-ghost={ghost}-keep_factors={keep}",
                      ConvFactors(weight, xe, gc, spec, ghost=ghost, keep_factors=keep)))
    return cases


@pytest.mark.parametrize(("name", "use"), _one_example_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_norm_bounds_what_the_clipped_sum_adds(name, use):
    """For a batch of one, ``‖weighted_sum([1])‖ ≤ √param_sq_norms`` and ``≥ the exact norm``."""
    bound = param_sq_norms([use]).sqrt().item()
    added = param_weighted_sum(use.param, [use], torch.ones(1, dtype=torch.float64))
    assert torch.isfinite(added).all()
    assert added.double().norm().item() <= bound, name
    exact = use.instantiate(torch.float64).norm().item()
    assert exact <= bound, name


def test_honest_float32_norms_stay_tight():
    """The bounds cost honest examples little: float32 norms within 1e-4 of the float64 truth."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    x, y = torch.randn(6, 24, 32), torch.randn(6, 24, 16)

    def loss(o, t):
        return ((o - t) ** 2).sum()

    _, want = reference_clipped_sum(copy.deepcopy(model).double(), loss, x.double(), y.double(), C)
    for mode in MODES:
        _, norms = _clipped_sum(model, loss, x, y, mode)
        rel = ((norms.double() - want) / want).abs().max().item()
        assert rel <= 1e-4, (mode, rel)
        assert bool((norms.double() >= want * (1 - 1e-6)).all()), mode


# -------------------------------------------------------------------- non-finite
class _SequenceMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.inp(x)) + self.inp(x))


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


def _sq_loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).sum()


def _bad_batch(model_kind: str, bad: str, j: int = 2) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(4)
    B, T = 5, 4
    if model_kind == "mlp":
        model: nn.Module = _SequenceMLP()
        x = torch.randn(B, T, 8)
        y = torch.randn(B, T, 3)
        if bad == "nan":
            x[j, 1, 3] = float("nan")
        else:
            x[j] = 1e38  # finite input, infinite activations and gradients
    else:
        model = _TokenModel()
        x = torch.randint(0, 11, (B, T))
        y = torch.randn(B, T, 3)
        y[j, 2] = float("nan") if bad == "nan" else 1e38  # a poisoned label
    return model, x, y


def _float64_copy(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


@pytest.mark.parametrize(
    "mode", [*MODES, "nanobatch"])
@pytest.mark.parametrize("model_kind", ["mlp", "embedding"])
@pytest.mark.parametrize("bad", ["nan", "huge"])
def test_nonfinite_example_is_dropped_exactly_and_reported(mode, model_kind, bad):
    j = 2
    model, x, y = _bad_batch(model_kind, bad, j)
    keep = [i for i in range(x.shape[0]) if i != j]
    # precondition: that example's own float32 gradient is not finite
    own = torch.autograd.grad(_sq_loss(model(x[j : j + 1]), y[j : j + 1]), list(model.parameters()))
    sq = sum(float(g.double().pow(2).sum()) for g in own)
    assert not all(bool(torch.isfinite(g).all()) for g in own) or not sq < 3.4e38**2

    with pytest.warns(NonFiniteGradientWarning, match=r"1 of 5 examples"):
        got, norms = _clipped_sum(model, _sq_loss, x, y, mode)
    assert bool(torch.isfinite(got).all()), "a released gradient is not finite"
    assert not bool(torch.isfinite(norms[j]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        others, _ = _clipped_sum(model, _sq_loss, x[keep], y[keep], mode)
    assert (got - others).abs().max().item() <= 1e-6 * others.abs().max().item()
    want, _ = reference_clipped_sum(
        copy.deepcopy(model).double(), _sq_loss, _float64_copy(x[keep]), y[keep].double(), C)
    want_flat = torch.cat([w.reshape(-1) for w in want])
    assert (got - want_flat).abs().max().item() <= 1e-5 * want_flat.abs().max().item()


def test_clip_factor_is_zero_for_nan_and_inf_norms_and_warns_once():
    norms = torch.tensor([0.5, float("nan"), 3.0, float("inf")])
    with pytest.warns(NonFiniteGradientWarning, match=r"2 of 4 examples") as rec:
        c = clip_factors(norms, 1.0)
    assert len(rec) == 1
    assert c.tolist()[1] == 0.0 and c.tolist()[3] == 0.0
    torch.testing.assert_close(c[[0, 2]], torch.tensor([1.0, 1.0 / (3.0 + 1e-6)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_factors(torch.tensor([0.5, 2.0]), 1.0, "automatic")


def test_dropped_example_with_nan_factors_leaves_the_weighted_sum_exact():
    """``0 · NaN`` is NaN: a dropped example's factors are masked, not multiplied by 0."""
    torch.manual_seed(5)
    a, g = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    a[1, 0, 0] = float("inf")
    g[1, 2, 1] = float("nan")
    w = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    param = torch.zeros(2, 5)
    want = 0.5 * g[0].T @ a[0] + 2.0 * g[2].T @ a[2]
    for ghost in (True, False):
        use = LinearFactors(param, a, g, ghost=ghost)
        got = param_weighted_sum(param, [use], w)
        torch.testing.assert_close(got, want)
        per = PerSampleGrads(param, torch.bmm(g.transpose(1, 2), a))
        torch.testing.assert_close(param_weighted_sum(param, [use, per], w), 2 * want)


# -------------------------------------------------------------------- subnormals
def _huge_input_tiny_gradient_cases(huge: float) -> list[tuple[str, object]]:
    """Example 0: one input element near float32's top, a tiny output gradient there.

    Its clip weight is ~ C / 3e38, so the weight times the output gradient
    lands among the float32 subnormals, whose rounding is absolute (2⁻¹⁵⁰),
    and the huge input magnifies that to ~1e-4 · C (found in review).
    """
    cases: list[tuple[str, object]] = []
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(2, 4, 4, 4)
    g = torch.zeros(2, 4, 4, 4)
    x[0, 0, 1, 1], g[0, 0, 1, 1] = huge, 1e-30
    x[1], g[1] = torch.randn(4, 4, 4, generator=gen), torch.randn(4, 4, 4, generator=gen)
    spec, xe = make_spec(x, (1, 1), 1, 0, 1, 1)
    weight = torch.zeros(4, 4, 1, 1)
    for ghost, keep in ((True, False), (False, False), (False, True)):
        cases.append((f"conv-4x4-ghost={ghost}-keep_factors={keep}",
                      ConvFactors(weight, xe, g, spec, ghost=ghost, keep_factors=keep)))
    x1, g1 = x[:, :, 1:2, 1:2].contiguous(), g[:, :, 1:2, 1:2].contiguous()
    one = make_spec(x1, (1, 1), 1, 0, 1, 1)[0]
    cases.append(("conv-1x1-map-ghost", ConvFactors(weight, x1, g1, one, ghost=True)))
    a, gl = x1.view(2, 1, 4), g1.view(2, 1, 4)
    cases.append(("linear-T=1-ghost", LinearFactors(torch.zeros(4, 4), a, gl, ghost=True)))
    return cases


@pytest.mark.parametrize("c", [1e-3, 1e-5])
def test_a_weight_times_gradient_among_the_subnormals_adds_at_most_c(c):
    """Before the fix, 3.3e38 · (1 - k·1e-4) for small k gave ‖added‖ = 1.0001 C
    (kept factors, and the ghost side at T = 1)."""
    for k in range(20):
        for name, use in _huge_input_tiny_gradient_cases(3.3e38 * (1 - k * 1e-4)):
            bound = param_sq_norms([use]).sqrt()
            dropped = ~torch.isfinite(bound) | torch.tensor([False, True])  # example 0 alone
            w = torch.where(dropped, 0.0, c / bound.clamp(min=c))
            added = param_weighted_sum(use.param, [use], w, dropped)
            assert added.double().norm().item() <= c, (name, k)


def _one_example_sum(model: nn.Module, x: Tensor, y: Tensor, c: float, mode: str,
                     groups: bool) -> float:
    """‖clipped sum‖ of a batch whose other examples contribute nothing (zero input and label)."""
    for p in model.parameters():
        p.grad = None
    limits = {"0": c} if groups else c
    objective = "instantiate" if mode == "bk-instantiate" else "time"
    clipper = swiftdp.GradClipper(model, limits, mode=mode.removesuffix("-instantiate"),
                                  loss_reduction="sum", cost_objective=objective)
    try:
        _dot_loss(model(x), y).backward()
    finally:
        clipper.remove()
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]).norm().item()


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("mode", [*MODES, "bk-instantiate", "nanobatch"])
def test_a_clip_weight_among_the_subnormals_adds_at_most_c(mode, groups):
    """A gradient near 3e38 makes the weight C / ‖g‖ subnormal in float32, where its cast
    rounds absolutely: before the fix, 1.02 C at C = 1e-5 (found in review)."""
    c = 1e-5
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    worst = 0.0
    for k in range(40):
        x = torch.zeros(2, 4)
        y = torch.zeros(2, 4)
        x[0, 1] = 3.0e38 * (1 - k * 7.3e-4)  # the output stays finite: 0.25 · x
        y[0, 2] = 1.0
        worst = max(worst, _one_example_sum(model, x, y, c, mode, groups))
    assert worst <= c
