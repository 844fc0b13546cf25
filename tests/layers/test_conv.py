"""Convolution rule (1d/2d/3d, groups, depthwise, padding modes) against the oracle."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import swiftdp
from support.harness import MODES, REDUCTIONS, check_against_oracle
from swiftdp.clipping.contributions import PerSampleGrads, pair_inner
from swiftdp.clipping.cost import ModePolicy
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers import conv as conv_rule
from swiftdp.layers import conv_geometry

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# How a conv's norms are formed: the cost model, or one strategy forced
# ("hybrid": instantiated for the norms only, the clipped sum from the factors).
PATHS = ("auto", "ghost", "native", "unfold", "hybrid", "mixed")


@contextmanager
def forced(path: str):
    """Force the conv rule's norm strategy (``auto`` leaves the cost model alone)."""
    if path == "auto":
        yield
        return
    cycle = itertools.cycle([True, False])
    keep_cycle = itertools.cycle([True, True, False])
    real = ModePolicy.factored_conv
    real_keep = ModePolicy.conv_sum_from_factors

    def prefer(policy, t, d, p):
        if policy.second_pass or policy.mode == "per_sample":
            return real(policy, t, d, p)
        return next(cycle) if path == "mixed" else path == "ghost"

    def keep(policy, factor_elems, grad_elems):
        if policy.second_pass or policy.mode == "per_sample":
            return real_keep(policy, factor_elems, grad_elems)
        return next(keep_cycle) if path == "mixed" else path == "hybrid"

    with (
        mock.patch.object(ModePolicy, "factored_conv", prefer),
        mock.patch.object(ModePolicy, "conv_sum_from_factors", keep),
        mock.patch.object(conv_geometry, "_use_unfold", lambda *_: path == "unfold"),
    ):
        yield


def conv_model(conv: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``conv → tanh → 1x1 conv`` in float64, and a random target for input ``x``."""
    n = x.dim() - 2
    model = nn.Sequential(conv, nn.Tanh(), CONV[n](conv.out_channels, 2, 1)).double()
    with torch.no_grad():
        y = torch.randn_like(model(x))
    return model, y


@st.composite
def conv_configs(draw):
    n = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    groups = {"plain": 1, "grouped": 2, "depthwise": draw(st.integers(1, 3))}[kind]
    c_in = groups * (1 if kind == "depthwise" else draw(st.integers(1, 2)))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1, "same", "valid", "tuple"]))
    if padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1, 1)[:n]]))
    bias = draw(st.booleans())
    size = (7, 6, 5)[n - 1]
    conv = CONV[n](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                   groups=groups, bias=bias)
    return conv, (c_in, *([size] * n))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    config=conv_configs(),
    batch=st.integers(0, 4),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_one_example_at_a_time_reference(mode, reduction, config, batch, path, seed):
    torch.manual_seed(seed)
    conv, shape = config
    x = torch.randn(batch, *shape, dtype=torch.float64)
    model, y = conv_model(conv, x)
    with forced(path):
        check_against_oracle(model, x, y, mode=mode, reduction=reduction)


@pytest.mark.parametrize("path", PATHS[1:5])
@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(3, 4, 3, padding=1), id="plain"),
        pytest.param(lambda: nn.Conv2d(4, 8, 3, stride=2, dilation=2, groups=4), id="depthwise-x2"),
        pytest.param(lambda: nn.Conv3d(4, 6, 2, padding="same", groups=2, bias=False), id="grouped-3d"),
        pytest.param(lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=1), id="even-same-1d"),
    ],
)
def test_every_norm_strategy_is_exact(path, conv):
    torch.manual_seed(3)
    layer = conv()
    x = torch.randn(4, layer.in_channels, *([6] * (layer.weight.dim() - 2)), dtype=torch.float64)
    model, y = conv_model(layer, x)
    with forced(path):
        check_against_oracle(model, x, y, mode="bk")


class TwiceConv(nn.Module):
    """One conv applied to two inputs of different sizes, outputs summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.tanh(self.conv(x)).mean((2, 3))
        b = torch.tanh(self.conv(x[:, :, ::2, ::2])).mean((2, 3))
        return self.head(a + b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
def test_conv_module_called_twice_is_exact(mode, path):
    torch.manual_seed(4)
    model = TwiceConv().double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    with forced(path):
        check_against_oracle(model, x, y, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_are_exact(mode, padding_mode):
    torch.manual_seed(5)
    layer = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model, y = conv_model(layer, x)
    check_against_oracle(model, x, y, mode=mode)


def test_unbatched_input_is_refused_naming_the_module():
    model = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3))
    clipper = swiftdp.GradClipper(model, 1.0)
    with pytest.raises(UnsupportedModuleError, match=r"`1`.*without a batch dimension"):
        model(torch.randn(3, 5, 5))
    clipper.remove()


class InPlaceAfterConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        h = x + 1
        y = self.conv(h)
        h.mul_(2)
        return y + h


def test_input_modified_in_place_after_the_conv_is_refused():
    model = InPlaceAfterConv().double()
    clipper = swiftdp.GradClipper(model, 1.0)
    loss = model(torch.randn(3, 2, 5, dtype=torch.float64)).mean()
    with pytest.raises(UnsupportedModuleError, match=r"`conv`.*modified in place"):
        loss.backward()
    clipper.remove()


@pytest.mark.parametrize("groups", [1, 3])
def test_inner_products_agree_across_representations(groups):
    torch.manual_seed(6)
    spec = conv_rule.ConvSpec((3, 2), (2, 1), (1, 0), (1, 2), groups)
    weight = torch.zeros(6, 6 // groups, 3, 2, dtype=torch.float64)
    xs = [torch.randn(4, 6, 7, 8, dtype=torch.float64) for _ in range(2)]
    gs = [torch.randn(4, 6, 4, 6, dtype=torch.float64) for _ in range(2)]
    want = [conv_rule.per_example_weight_grads(x, g, spec, tuple(weight.shape)) for x, g in zip(xs, gs, strict=True)]
    # reference per-example gradients, one example at a time
    for i in range(4):
        w = weight.clone().requires_grad_()
        out = torch.nn.functional.conv2d(xs[0][i : i + 1], w, None, (2, 1), (1, 0), (1, 2), groups)
        (ref,) = torch.autograd.grad(out, w, gs[0][i : i + 1])
        torch.testing.assert_close(want[0][i], ref)
    expected = (want[0] * want[1]).flatten(1).sum(1)
    reps = []
    for x, g, full in zip(xs, gs, want, strict=True):
        reps.append([
            conv_rule.ConvFactors(weight, x, g, spec, ghost=True),
            conv_rule.ConvFactors(weight, x, g, spec, ghost=False),
            conv_rule.ConvFactors(weight, x, g, spec, ghost=False, keep_factors=True),
            PerSampleGrads(weight, full),
        ])
    for a, b in itertools.product(reps[0], reps[1]):
        torch.testing.assert_close(pair_inner(a, b), expected)
    for c in reps[0]:
        torch.testing.assert_close(c.sq_norms(), want[0].flatten(1).pow(2).sum(1))
        torch.testing.assert_close(c.instantiate(), want[0])


@pytest.mark.parametrize("mode", MODES)
def test_frozen_weight_with_trainable_bias_is_exact(mode):
    torch.manual_seed(7)
    layer = nn.Conv2d(2, 4, 3, groups=2)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model, y = conv_model(layer, x)
    check_against_oracle(model, x, y, mode=mode)


# ------------------------------------------------- norms instantiated, sum from factors
class WideOnSmallMaps(nn.Module):
    """A narrow stem on 16×16 maps, then two 32-channel convs on 8×8 maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 32, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(32, 32, 3, padding=1)
        self.wide2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.wide(h))
        return self.head(torch.tanh(self.wide2(h)).mean((2, 3)))


@contextmanager
def recording_convs():
    """Record, per weight shape, whether each ConvFactors built keeps its factors."""
    seen: list[tuple[tuple[int, ...], bool, bool]] = []
    real = conv_rule.ConvFactors.__init__

    def init(self, param, x, g, spec, *, ghost, keep_factors=False):
        real(self, param, x, g, spec, ghost=ghost, keep_factors=keep_factors)
        seen.append((tuple(param.shape), ghost, self.hybrid))

    with mock.patch.object(conv_rule.ConvFactors, "__init__", init):
        yield seen


def test_the_cost_model_keeps_the_factors_of_wide_convs_on_small_maps():
    torch.manual_seed(8)
    model = WideOnSmallMaps().double()
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    with recording_convs() as seen:
        check_against_oracle(model, x, y, mode="bk")
    kept = {shape: hybrid for shape, ghost, hybrid in seen if not ghost}
    # 32 → 32 on 8×8 instantiates (64 · (288 + 32) > 288 · 32), and its input
    # and output gradient, 2 · 2048 per example, are at most half its 9216 weights
    assert kept.get((32, 32, 3, 3)) is True
    # the stem's (512 + 2048 per example) outweigh half its 576 weights
    assert kept.get((32, 2, 3, 3), False) is False
    assert not ModePolicy("ghost").conv_sum_from_factors(1, 100)
    assert not ModePolicy("bk", "instantiate").conv_sum_from_factors(1, 100)
    assert not ModePolicy("bk", second_pass=True).conv_sum_from_factors(1, 100)


@pytest.mark.parametrize("forced_path", ["hybrid", "auto"])
def test_kept_factors_move_the_float32_sum_by_at_most_c_without_one_example(forced_path):
    """Neighbour sensitivity in float32, large inputs: the norm from instantiated gradients
    and the sum from the factors must still agree within the bound."""
    from support.sensitivity import neighbour_sensitivity

    torch.manual_seed(9)
    model = WideOnSmallMaps()
    x = 300.0 * torch.randn(6, 2, 16, 16)
    x[2] = 1e4 * (1 + 1e-6 * torch.randn(2, 16, 16))  # near-constant patches: cancelling terms
    y = torch.randn(6, 3)
    c = 1e-3

    def run(batch):
        xb, yb = batch
        for p in model.parameters():
            p.grad = None
        clipper = swiftdp.GradClipper(model, c, mode="bk", loss_reduction="sum")
        try:
            with forced(forced_path), recording_convs() as seen:
                ((model(xb) - yb) ** 2).sum().backward()
        finally:
            clipper.remove()
        assert any(h for _, _, h in seen)
        return [p.grad for p in model.parameters()]

    sens = neighbour_sensitivity(run, (x, y), 6)
    assert c * 0.99 <= sens <= c * (1 + 1e-6)


def test_kept_factors_of_augmented_views_are_clipped_as_one_example():
    """Rows merged per example (augmentation multiplicity) with the factors kept, and the
    layer that falls back to instantiating once the rows outweigh the gradient."""
    from support.oracle import reference_clipped_sum

    torch.manual_seed(10)
    K, B = 3, 4
    model = WideOnSmallMaps().double()
    xs = torch.randn(B, K, 2, 16, 16, dtype=torch.float64)
    ys = torch.randn(B, 3, dtype=torch.float64)

    def loss(out, y):
        return ((out - y.repeat_interleave(K, 0)) ** 2).sum()

    want, _ = reference_clipped_sum(model, loss, xs, ys, 0.05, call=lambda m, x: m(x.flatten(0, 1)))
    clipper = swiftdp.GradClipper(model, 0.05, mode="bk", augmult=K, loss_reduction="sum")
    try:
        with forced("hybrid"):
            out = model(xs)
            ((out - ys[:, None]) ** 2).sum().backward()
    finally:
        clipper.remove()
    got = [p.grad for p in model.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("c", "size", "stays"), [(16, 3, True), (4, 6, False)])
def test_kept_factors_merge_rows_like_instantiated_gradients(c, size, stays):
    """``merge_rows`` keeps the factors while an example's rows hold at most half its
    gradient, and instantiates otherwise; either way norms and sums are the examples'."""
    torch.manual_seed(11)
    per, b = 2, 3
    spec = conv_rule.ConvSpec((3, 3), (1, 1), (1, 1), (1, 1), 1)
    weight = torch.zeros(c, c, 3, 3, dtype=torch.float64)
    x = torch.randn(b * per, c, size, size, dtype=torch.float64)
    g = torch.randn(b * per, c, size, size, dtype=torch.float64)
    kept = conv_rule.ConvFactors(weight, x, g, spec, ghost=False, keep_factors=True).merge_rows(per)
    assert kept.hybrid is stays and (kept.grads is None) is stays
    rows = conv_rule.per_example_weight_grads(x, g, spec, tuple(weight.shape))
    want = rows.view(b, per, *weight.shape).sum(1)
    torch.testing.assert_close(kept.sq_norms(), want.flatten(1).pow(2).sum(1))
    w = torch.rand(b, dtype=torch.float64)
    dropped = torch.tensor([False, True, False])
    expect = (w * ~dropped).view(-1, 1, 1, 1, 1).mul(want).sum(0)
    torch.testing.assert_close(kept.weighted_sum(w, dropped), expect)
    assert bool((kept.mass() >= want.flatten(1).norm(dim=1)).all())


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding", "dilation"),
    [
        ((2, 3, 10, 12), (3, 3), (1, 1), (1, 1), (1, 1)),  # rows of 12: the view
        ((2, 3, 10, 12), (3, 2), (2, 1), (0, 1), (1, 2)),  # rows of 12 (stride, dilation)
        ((2, 4, 9, 20), (2, 3), (1, 2), (1, 0), (2, 1)),   # rows of 9
        ((2, 3, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1)),    # rows of 6: F.unfold
        ((2, 2, 30), (4,), (3,), (2,), (2,)),              # 1d: the view
    ],
)
def test_patches_equal_torch_unfold(shape, kernel, stride, padding, dilation):
    x = torch.randn(*shape, dtype=torch.float64)
    spec = conv_rule.ConvSpec(kernel, stride, padding, dilation, 1)
    got = conv_rule.patches(x, spec)
    if len(kernel) == 1:  # torch's unfold is 2d: a unit height
        want = torch.nn.functional.unfold(x.unsqueeze(2), (1, *kernel), dilation=(1, *dilation),
                                          padding=(0, *padding), stride=(1, *stride))
    else:
        want = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding,
                                          stride=stride)
    assert torch.equal(got, want)
