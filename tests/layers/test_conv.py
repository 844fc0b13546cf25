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

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# How a conv's norms are formed: the cost model, or one strategy forced.
PATHS = ("auto", "ghost", "native", "unfold", "mixed")


@contextmanager
def forced(path: str):
    """Force the conv rule's norm strategy (``auto`` leaves the cost model alone)."""
    if path == "auto":
        yield
        return
    cycle = itertools.cycle([True, False])
    real = ModePolicy.factored_conv

    def prefer(policy, t, d, p):
        if policy.second_pass or policy.mode == "per_sample":
            return real(policy, t, d, p)
        return next(cycle) if path == "mixed" else path == "ghost"

    with (
        mock.patch.object(ModePolicy, "factored_conv", prefer),
        mock.patch.object(conv_rule, "_use_unfold", lambda t, p: path == "unfold"),
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


@pytest.mark.parametrize("path", PATHS[1:4])
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
