"""Tensor hooks on the model's outputs may read their gradient, never change it.

An output's gradient comes from the loss and flows into every layer: a hook
that rewrites it (``out.register_hook(lambda g: g + 3 * g.roll(1, 0))``)
moves one example's loss into another's gradient, which per-example clipping
cannot bound. The pipeline review measured 1.04·C for one step with such a
hook switched on at step 3, when the outputs were traced only on the loss
check's steps; they are traced at every step now, and the hook is refused at
the step it is registered, before any gradient reaches a layer. A hook that
only reads is kept: the clipped sum is exact against one example at a time
with plain autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import UnsupportedModuleError

F64 = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("switch_on", [0, 1, 2, 3, 5, 6])
@pytest.mark.parametrize("hook", [
    lambda g: g + 3 * g.roll(1, 0),                      # returns a mixed gradient
    lambda g: g.add_(3 * g.roll(1, 0)),                  # mixes in place
    lambda g: g * 0,                                     # drops the gradient
], ids=["returned", "in-place", "zeroed"])
def test_a_gradient_rewriting_hook_on_the_output_is_refused_at_its_step(switch_on, hook):
    model = _model()
    data = TensorDataset(torch.randn(200, 4, dtype=F64), torch.randint(0, 3, (200,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(data, batch_size=20), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=12, seed=0)
    refused = None
    for step, (x, y) in enumerate(dp.data_loader):
        dp.optimizer.zero_grad()
        out = dp.model(x)
        if step >= switch_on:
            out.register_hook(hook)
        try:
            F.cross_entropy(out, y).backward()
        except UnsupportedModuleError as e:
            assert "on a model output" in str(e) and "read gradients" in str(e)
            refused = step
            break
        dp.optimizer.step()
        if step == 8:
            break
    assert refused == switch_on
    assert dp.steps == switch_on  # no step was released with the hook's gradient


def test_a_hook_on_a_tensor_computed_from_the_output_is_refused_too():
    model = _model()
    clipper = swiftdp.GradClipper(model, 1.0)
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    for _ in range(5):
        F.cross_entropy(model(x), y).backward()
    logp = model(x).log_softmax(1)
    logp.register_hook(lambda g: g.flip(0))
    with pytest.raises(UnsupportedModuleError, match="on a model output"):
        F.nll_loss(logp, y).backward()
    clipper.remove()


def test_a_reading_hook_sees_the_gradient_and_the_clipped_sum_is_exact():
    model = _model()
    clipper = swiftdp.GradClipper(model, 0.5, loss_reduction="sum")
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    seen = []
    for _ in range(6):  # later steps too, not only the checked ones
        for p in model.parameters():
            p.grad = None
        out = model(x)
        out.register_hook(lambda g: seen.append(g.clone()))
        F.cross_entropy(out, y, reduction="sum").backward()
    got = [p.grad.clone() for p in model.parameters()]
    clipper.remove()
    want = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):  # the reference: one example at a time, plain autograd
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
        scale = min(1.0, 0.5 / float(norm))
        for w, t in zip(want, g, strict=True):
            w.add_(t * scale)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want, strict=True))
    assert len(seen) >= 6 and seen[-1].shape == (8, 3)
