"""Forced cost objectives: ``"ghost"`` and ``"instantiate"`` decide every factored layer, exactly.

The sweep (``swiftdp bench --sweep``) times each side of the ghost-or-instantiate
choice on its own. Forcing a side must change only speed: the clipped sums and
norms stay equal to the one-example-at-a-time reference (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.checks import check_cost_objective
from swiftdp.clipping.cost import (
    INSTANTIATED_PASS_COST,
    ModePolicy,
    factored_costs,
    prefer_ghost,
)
from swiftdp.errors import InvalidArgumentError

OBJECTIVES = ("time", "ghost", "instantiate")
TOL = 1e-6


class SequenceModel(nn.Module):
    """A linear over sequences, a pre-norm transformer layer (stock attention), a pooled head."""

    def __init__(self, d_in: int = 6, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.proj(x)).mean(1))


class ConvModel(nn.Module):
    """Conv3x3 + GroupNorm + ReLU with a residual, a strided conv, a pooled head."""

    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.gn(self.conv(h)))
        return self.head(F.relu(self.down(h)).mean((2, 3)))


def _batch(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "sequence":
        return SequenceModel().double(), torch.randn(4, 40, 6, dtype=torch.float64), \
            torch.randint(0, 3, (4,))
    return ConvModel().double(), torch.randn(4, 2, 6, 6, dtype=torch.float64), \
        torch.randint(0, 3, (4,))


def _record_choices(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...], bool]]:
    """Record every ghost-or-instantiate decision the layer rules ask for."""
    seen: list[tuple[str, tuple[int, ...], bool]] = []
    factored, factored_conv = ModePolicy.factored, ModePolicy.factored_conv
    in_conv = [False]  # factored_conv asks factored itself: record the conv's answer only

    def linear(self: ModePolicy, *shape: int) -> bool:
        out = factored(self, *shape)
        if not self.second_pass and not in_conv[0]:
            seen.append(("linear", shape, out))
        return out

    def conv(self: ModePolicy, *shape: int) -> bool:
        in_conv[0] = True
        try:
            out = factored_conv(self, *shape)
        finally:
            in_conv[0] = False
        if not self.second_pass:
            seen.append(("conv", shape, out))
        return out

    monkeypatch.setattr(ModePolicy, "factored", linear)
    monkeypatch.setattr(ModePolicy, "factored_conv", conv)
    return seen


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("kind", ["sequence", "conv"])
def test_forced_objective_clipped_sum_matches_one_example_at_a_time_reference(
    kind: str, mode: str, objective: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x, y = _batch(kind)
    C = 0.5
    want, want_norms = reference_clipped_sum(
        model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y, C)
    seen = _record_choices(monkeypatch)
    clipper = swiftdp.GradClipper(model, C, mode=mode, cost_objective=objective)  # type: ignore[arg-type]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        clipper.remove()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    err = max_rel_error(got, want)
    assert err <= TOL, f"{kind} {mode} {objective}: clipped sum rel. error {err:.3e}"
    assert clipper.last_norms is not None
    nerr = ((clipper.last_norms.double() - want_norms).abs().max() / want_norms.max()).item()
    assert nerr <= TOL, f"{kind} {mode} {objective}: norm rel. error {nerr:.3e}"
    choices = [ghost for _, _, ghost in seen]
    assert choices, "no factored layer asked for a choice"
    if objective == "ghost":
        assert all(choices)
    elif objective == "instantiate":
        assert not any(choices)
    elif mode == "bk":  # the cost model mixes: these shapes straddle its crossover
        assert any(choices) and not all(choices), seen


def test_forced_objectives_override_the_cost_model_for_every_shape() -> None:
    shapes = [(1, 8, 3), (5, 6, 8), (5, 8, 24), (64, 256, 256), (4096, 16, 16)]
    for mode in ("bk", "ghost"):
        for t, d, p in shapes:
            assert ModePolicy(mode, "ghost").factored(t, d, p)
            assert ModePolicy(mode, "ghost").factored_conv(t, d, p)
            assert not ModePolicy(mode, "instantiate").factored(t, d, p)
            assert not ModePolicy(mode, "instantiate").factored_conv(t, d, p)
    # the shipped choice differs from each forced side somewhere
    time = ModePolicy("bk", "time")
    assert time.factored(1, 8, 3) and not time.factored(4096, 16, 16)
    # per_sample instantiates whatever the objective; ghost's second pass keeps the factors
    assert not ModePolicy("per_sample", "ghost").factored(64, 256, 256)
    assert ModePolicy("ghost", "instantiate", second_pass=True).factored(64, 256, 256)


def test_prefer_ghost_time_is_the_factored_cost_comparison() -> None:
    # T=4, d=3, p=5: ghost 16·8 + 60 = 188, instantiate (arithmetic) 60 + 15 + 15 = 90
    assert factored_costs(4, 3, 5) == (188, 90)
    assert factored_costs(4, 3, 5, reuse_for_sum=False) == (128, 75)
    c = INSTANTIATED_PASS_COST
    assert factored_costs(4, 3, 5, pass_cost=c) == (188, 60 + 2 * c * 15)
    assert prefer_ghost(4, 3, 5) == (188 < 60 + 2 * c * 15)
    # a transformer feed-forward at d = 1024, T = 128: 128²·5120 < 64·4096·1024
    assert prefer_ghost(128, 1024, 4096)
    assert not prefer_ghost(128, 1024, 4096, "instantiate")
    # long sequences still instantiate: 1024²·1280 > 64·1024·256
    assert not prefer_ghost(1024, 256, 1024)


@pytest.mark.parametrize("value", ["time", "memory", "ghost", "instantiate"])
def test_check_cost_objective_accepts_the_four_objectives(value: str) -> None:
    check_cost_objective(value)


def test_check_cost_objective_names_the_four_on_an_unknown_value() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_cost_objective("fastest")
    msg = str(info.value)
    assert "cost_objective" in msg and "'fastest'" in msg
    for value in ("time", "memory", "ghost", "instantiate"):
        assert repr(value) in msg
    with pytest.raises(InvalidArgumentError):
        swiftdp.GradClipper(nn.Linear(2, 2), 1.0, cost_objective="instantiated")  # type: ignore[arg-type]


def test_a_conv_within_the_tie_band_takes_the_ghost_side_which_holds_less() -> None:
    time = ModePolicy("bk", "time")
    # 64→64 3×3 on 8×8: ghost counts 64·640 = 1.11 × 36,864 and holds 2·64² < 36,864
    assert time.factored_conv(64, 576, 64)
    # 32→64 3×3 to 8×8: 64·352 = 1.22 × 18,432, outside the band: instantiated
    assert not time.factored_conv(64, 288, 64)
    # linear layers keep the strict count (ViT-tiny's projections, 1.015×)
    assert not time.factored(65, 128, 128)
