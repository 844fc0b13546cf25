"""Linear rule and the parameter-use fallbacks against the one-at-a-time oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from support.harness import MODES, REDUCTIONS, check_against_oracle


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(
    batch=st.integers(0, 5),
    seq=st.sampled_from([None, 1, 3]),
    d=st.integers(1, 6),
    p=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_one_example_at_a_time_reference(mode, reduction, batch, seq, d, p, bias, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 5, bias=bias), nn.Tanh(), nn.Linear(5, p)).double()
    shape = (batch, d) if seq is None else (batch, seq, d)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], p, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, reduction=reduction)


class LearnedScaleAndPosition(nn.Module):
    """A bare position-embedding parameter and a learned scale, broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.pos = nn.Parameter(torch.randn(3, 6))
        self.scale = nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.pos) * self.scale
        h = h + F.relu(self.inp(x))  # the same module called twice
        return self.out(h).mean(1)


class CustomWeightLayer(nn.Module):
    """Arbitrary math with its own parameter: handled by the generic torch.func rule."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        w = self.w / self.w.norm(dim=1, keepdim=True)  # weight normalisation
        return torch.sin(x @ w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast_parameters_and_reused_module_are_exact(mode, reduction):
    torch.manual_seed(0)
    model = LearnedScaleAndPosition().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_custom_parameter_layer_uses_generic_rule(mode, clipping):
    torch.manual_seed(1)
    model = nn.Sequential(CustomWeightLayer(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, clipping=clipping)


def test_sequence_first_layout_with_batch_first_false():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 5, 4, dtype=torch.float64)  # (T, B, d)
    y = torch.randn(7, 5, 3, dtype=torch.float64)

    def per_example(out, t):
        return ((out - t) ** 2).sum((0, 2))

    for mode in MODES:
        check_against_oracle(model, x, y, mode=mode, batch_first=False, per_example=per_example)


def test_input_modified_in_place_after_use_is_refused():
    import swiftdp
    from swiftdp.errors import UnsupportedModuleError

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = x * 2
            out = self.lin(h)
            h.add_(1.0)  # the linear's saved input is now stale
            return out

    model = InPlace()
    clipper = swiftdp.GradClipper(model, 1.0)
    with pytest.raises(UnsupportedModuleError, match="modified in place"):
        model(torch.randn(2, 3, requires_grad=True)).mean().backward()
    clipper.remove()


class SlicedPositionTable(nn.Module):
    """A position table longer than the sequence, sliced per forward (``pos[:, :t]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.pos = nn.Parameter(torch.randn(1, 9, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x) + self.pos[:, : x.shape[1]]
        return self.out(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_sliced_parameter_uses_expand_rule_not_generic(mode, monkeypatch):
    import swiftdp.clipping.generic as generic

    def no_generic(*a, **k):
        raise AssertionError("the generic rule should not be needed for a sliced table")

    monkeypatch.setattr(generic, "capture_module_output", no_generic)
    torch.manual_seed(3)
    model = SlicedPositionTable().double()
    x = torch.randn(5, 4, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode)


class _Conv1D(nn.Module):
    """Hugging Face's Conv1D: ``torch.addmm(bias, x.view(-1, d), weight)``, weight ``(d, p)``."""

    def __init__(self, d: int, p: int, merged: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, p) * 0.3)
        self.bias = nn.Parameter(torch.randn(p) * 0.1)
        self.merged = merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:  # (B, d)
            return torch.addmm(self.bias, x, self.weight)
        out = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)  # (B * T, p)
        return out.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("merged", [True, False])
def test_addmm_with_a_transposed_weight_is_exact(mode, merged):
    torch.manual_seed(0)
    model = nn.Sequential(_Conv1D(5, 3, merged), nn.Tanh(), _Conv1D(3, 2, merged)).double()
    shape = (4, 6, 5) if merged else (4, 5)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 2, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode)
