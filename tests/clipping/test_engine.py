"""Engine contracts: cost model per batch, refusals, no tracking outside training passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from swiftdp.clipping import contributions
from swiftdp.clipping.clip_fns import clip_factors
from swiftdp.clipping.cost import prefer_ghost
from swiftdp.errors import UnsupportedModuleError


def test_cost_model_prefers_ghost_for_short_sequences_and_instantiation_for_long():
    assert prefer_ghost(1, 512, 512)
    assert prefer_ghost(4, 256, 256)
    assert not prefer_ghost(512, 64, 64)
    assert prefer_ghost(64, 512, 512, "memory")  # 2·64² < 512²
    assert not prefer_ghost(512, 64, 64, "memory")


def test_cost_model_decides_on_every_batch_never_cached(monkeypatch):
    decisions = []
    orig = contributions.LinearFactors.__init__

    def spy(self, param, a, g, *, ghost, region=None):
        decisions.append((a.shape[1], ghost))
        orig(self, param, a, g, ghost=ghost, region=region)

    monkeypatch.setattr(contributions.LinearFactors, "__init__", spy)
    model = nn.Linear(16, 16)
    clipper = swiftdp.GradClipper(model, 1.0)
    for t in (2, 300, 2):
        model(torch.randn(4, t, 16)).mean().backward()
    clipper.remove()
    assert decisions == [(2, True), (300, False), (2, True)]


def test_flat_and_automatic_clip_factors_bound_every_example_by_c():
    norms = torch.tensor([0.0, 0.5, 1.0, 10.0, 1e6])
    for style in ("flat", "automatic"):
        c = clip_factors(norms, 1.0, style)
        assert torch.all(c * norms <= 1.0 + 1e-12)
    torch.testing.assert_close(clip_factors(norms, 1.0, "flat")[:2], torch.ones(2))


def test_batchnorm_is_refused_naming_the_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)))
    with pytest.raises(UnsupportedModuleError, match=r"`1.0` \(BatchNorm1d\)"):
        swiftdp.GradClipper(model, 1.0)


def test_no_tracking_under_no_grad_and_after_remove():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    clipper = swiftdp.GradClipper(model, 1e-3)
    with torch.no_grad():
        model(torch.randn(5, 3))
    clipper.remove()
    x = torch.randn(5, 3)
    F.mse_loss(model(x), torch.zeros(5, 2)).backward()
    ref = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ref.load_state_dict(model.state_dict())
    F.mse_loss(ref(x), torch.zeros(5, 2)).backward()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_every_trainable_parameter_gets_a_gradient_even_if_unused():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Partial()
    clipper = swiftdp.GradClipper(model, 1.0)
    model(torch.randn(4, 3)).mean().backward()
    clipper.remove()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.count_nonzero(model.unused.weight.grad) == 0


def test_clipped_sum_norm_is_bounded_by_c_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    clipper = swiftdp.GradClipper(model, 0.25, loss_reduction="sum")
    x = torch.randn(1, 5) * 100
    F.cross_entropy(model(x), torch.tensor([1]), reduction="sum").backward()
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total <= 0.25 + 1e-5
    assert clipper.last_norms is not None and clipper.last_norms[0] > 0.25


@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        (nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq=False"),
        (nn.Embedding(5, 3, max_norm=1.0), "max_norm=None"),
        (nn.Embedding(5, 3, sparse=True), "sparse=False"),
    ],
)
def test_nanobatch_mode_refuses_batch_dependent_module_options(module, pattern):
    model = nn.Sequential(module)
    clipper = swiftdp.GradClipper(model, 1.0, mode="nanobatch")
    with pytest.raises(UnsupportedModuleError, match=pattern):
        model(torch.tensor([[1, 2]]))
    clipper.remove()
