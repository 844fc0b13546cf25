"""Normalisation-layer rules (LayerNorm, RMSNorm, GroupNorm, InstanceNorm) against the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import swiftdp
from support.harness import MODES, REDUCTIONS, check_against_oracle
from swiftdp.errors import UnsupportedModuleError

KINDS = ("layer", "layer_2d", "rms", "group", "instance", "instance_eval")


class NormNet(nn.Module):
    """Linear → norm → tanh → linear, with the norm's layout as each kind expects."""

    def __init__(self, kind: str, seq: int, channels: int, affine: bool, bias: bool, eps_none: bool):
        super().__init__()
        self.kind = kind
        # instance statistics remove a per-channel shift: an input bias would get a zero
        # gradient, made of rounding noise only
        self.inp = nn.Linear(3, channels, bias=kind != "instance")
        if kind == "layer":
            self.norm: nn.Module = nn.LayerNorm(channels, elementwise_affine=affine, bias=bias)
        elif kind == "layer_2d":
            self.norm = nn.LayerNorm((seq, channels), elementwise_affine=affine, bias=bias)
        elif kind == "rms":
            self.norm = nn.RMSNorm(channels, eps=None if eps_none else 1e-3, elementwise_affine=affine)
        elif kind == "group":
            self.norm = nn.GroupNorm(2 if channels % 2 == 0 and channels > 2 else 1, channels, affine=affine)
        else:
            track = kind == "instance_eval"
            self.norm = nn.InstanceNorm1d(channels, affine=affine, track_running_stats=track)
            if track:
                self.norm.running_mean.normal_()
                self.norm.running_var.uniform_(0.5, 2.0)
                self.norm.eval()
        self.out = nn.Linear(channels, 2)

    def forward(self, x):  # x: (B, T, 3)
        h = self.inp(x)
        if self.kind in ("group", "instance", "instance_eval"):
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.norm(h)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@given(
    batch=st.integers(0, 4),
    seq=st.integers(1, 4),
    channels=st.integers(2, 5),  # one normalised element is degenerate (x̂ = 0)
    affine=st.booleans(),
    bias=st.booleans(),
    eps_none=st.booleans(),
    freeze=st.sampled_from([None, "weight", "bias"]),
    seed=st.integers(0, 2**16),
)
def test_norm_layers_match_one_example_at_a_time_reference(
    mode, reduction, kind, batch, seq, channels, affine, bias, eps_none, freeze, seed
):
    if kind.startswith("instance"):  # native kernel: >= 1 example (see the empty-batch test)
        batch = max(batch, 1)
    if kind == "instance":  # >= 2 positions when training; 2 give x̂ = ±1 (degenerate)
        seq = max(seq, 3)
    torch.manual_seed(seed)
    model = NormNet(kind, seq, channels, affine, bias, eps_none).double()
    if affine:
        model.norm.weight.data.normal_()  # non-trivial scale and shift
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.data.normal_()
    if freeze is not None and getattr(model.norm, freeze, None) is not None:
        getattr(model.norm, freeze).requires_grad_(False)
    x = torch.randn(batch, seq, 3, dtype=torch.float64)
    y = torch.randn(batch, seq, 2, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode, reduction=reduction)


class SeqFirstBlock(nn.Module):
    """A pre-norm residual block on ``(T, B, d)`` activations."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = x + torch.tanh(self.fc(self.ln(x)))
        return self.rms(h)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(batch=st.integers(0, 4), seq=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_layer_norm_in_sequence_first_model(mode, reduction, batch, seq, seed):
    torch.manual_seed(seed)
    model = SeqFirstBlock(4).double()
    for p in (model.ln.weight, model.ln.bias, model.rms.weight):
        p.data.normal_()
    x = torch.randn(seq, batch, 4, dtype=torch.float64)
    y = torch.randn(seq, batch, 4, dtype=torch.float64)

    def per_example(out, t):
        return ((out - t) ** 2).sum((0, 2))

    check_against_oracle(
        model, x, y, mode=mode, reduction=reduction, batch_first=False, per_example=per_example
    )


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_instance_norm_runs_on_an_empty_batch(mode):
    model = NormNet("instance", 3, 2, True, True, False).double()
    x = torch.randn(0, 3, 3, dtype=torch.float64)
    with swiftdp.GradClipper(model, 1.0, mode=mode):
        model(x).sum().backward()
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_instance_norm_updating_running_stats_is_refused(mode):
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2, affine=True, track_running_stats=True))
    model[0].requires_grad_(False)
    stats = model[1].running_mean.clone()
    with swiftdp.GradClipper(model, 1.0, mode=mode):
        with pytest.raises(UnsupportedModuleError, match=r"`1`.*track_running_stats=False"):
            model(torch.randn(3, 2, 5))
    torch.testing.assert_close(model[1].running_mean, stats)


def test_norm_over_the_batch_dimension_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm((4, 3)))
    with swiftdp.GradClipper(model, 1.0):
        with pytest.raises(UnsupportedModuleError, match=r"`1`.*include the batch dimension"):
            model(torch.randn(4, 3))


# ------------------------------------------- LayerNorm: x̂ from the kernel's own statistics
class _OffsetLN(nn.Module):
    """An input far from zero mean (x̂ from (x − mean)·rstd must not cancel badly)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.ln(x * 1e-2 + 1e3)))


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_from_saved_statistics_matches_the_oracle_far_from_zero_mean(mode):
    torch.manual_seed(3)
    model = _OffsetLN().double()
    nn.init.normal_(model.ln.weight)
    nn.init.normal_(model.ln.bias)
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    y = torch.randn(5, 4, 3, dtype=torch.float64)
    check_against_oracle(model, x, y, mode=mode)


def test_layer_norm_from_saved_statistics_bounds_each_example_in_float32():
    from support.sensitivity import neighbour_sensitivity

    torch.manual_seed(4)
    model = _OffsetLN()
    nn.init.normal_(model.ln.weight, std=10.0)
    x = torch.randn(6, 5, 6) * torch.logspace(-3, 3, 6).view(6, 1, 1)
    y = torch.randint(0, 3, (6, 5))
    C = 0.25

    def clipped_sum(batch):
        xb, yb = batch
        for p in model.parameters():
            p.grad = None
        clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
        try:
            out = model(xb)
            torch.nn.functional.cross_entropy(out.reshape(-1, 3), yb.reshape(-1),
                                              reduction="sum").backward()
        finally:
            clipper.remove()
        return [p.grad.clone() for p in model.parameters()]

    assert neighbour_sensitivity(clipped_sum, (x, y), 6) <= C * (1 + 1e-5)


def test_layer_norm_under_autocast_keeps_its_cast_policy():
    torch.manual_seed(5)
    model = _OffsetLN()
    x = torch.randn(3, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.ln(x).dtype
    clipper = swiftdp.GradClipper(model, 1.0, loss_reduction="sum")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.ln(x)
            assert got.dtype == want
            model.out(got.float()).sum().backward()
    finally:
        clipper.remove()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ("layer", "rms", "group", "instance"))
def test_norm_input_modified_in_place_after_use_is_refused(kind):
    """x̂ is formed in the backward: an input changed in place since the forward is refused.

    The input needs no grad (data fed straight to the norm), so autograd's own
    saved-tensor check does not fire; without ours the weight's per-example
    gradients would silently come from the changed input.
    """
    norm = {"layer": nn.LayerNorm(4), "rms": nn.RMSNorm(4), "group": nn.GroupNorm(2, 4),
            "instance": nn.InstanceNorm1d(4, affine=True)}[kind]

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm
            self.out = nn.Linear(4 if kind in ("layer", "rms") else 3, 2)

        def forward(self, x):  # x: (B, 3, 4), needs no grad
            h = x * 2
            out = self.out(self.norm(h).tanh())
            h.mul_(3.0).add_(1.0)  # the norm's input is now another tensor
            return out

    model = InPlace()
    clipper = swiftdp.GradClipper(model, 1.0)
    try:
        with pytest.raises(UnsupportedModuleError, match="modified in place"):
            model(torch.randn(2, 3, 4) if kind in ("layer", "rms") else
                  torch.randn(2, 4, 3)).mean().backward()
    finally:
        clipper.remove()
