"""Module backward hooks are refused: they could rewrite gradients after the engine captured them.

A full backward hook that adds the batch mean of the gradient flowing down
(ordinary-looking "gradient centring") gives the layers below gradients that
mix the examples: without the refusal one example's presence moves the
clipped sum by 1.1·C (measured against the plain per-example reference by
the pipeline review). Both module and global hooks, registered before or
after make_private, are refused at the forward, naming the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import UnsupportedModuleError


def _mix(module: nn.Module, grad_in: tuple, grad_out: tuple) -> tuple:
    return tuple(None if g is None else g + g.mean(0, keepdim=True) for g in grad_in)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", ["full", "pre"])
def test_a_module_backward_hook_is_refused(when, kind):
    model = _model()

    def hook() -> None:
        if kind == "full":
            model[1].register_full_backward_hook(_mix)
        else:
            model[1].register_full_backward_pre_hook(lambda m, g: (g[0] + g[0].mean(0),))

    if when == "before":
        hook()
    data = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(data, batch_size=5), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=2, seed=0)
    if when == "after":
        hook()
    x = torch.randn(5, 4)
    with pytest.raises(UnsupportedModuleError, match=r"Module `1` \(Tanh\) has a backward hook"):
        dp.model(x)


def test_a_global_backward_hook_is_refused_and_removing_it_works():
    model = _model()
    clipper = swiftdp.GradClipper(model, 1.0)
    handle = torch.nn.modules.module.register_module_full_backward_hook(_mix)
    try:
        with pytest.raises(UnsupportedModuleError, match="global module backward hook"):
            model(torch.randn(5, 4))
    finally:
        handle.remove()
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    assert all(p.grad is not None for p in model.parameters())
    clipper.remove()


def test_a_tensor_hook_on_an_activation_may_read_but_not_change_its_gradient():
    """Registered in the forward at any step: a reading hook runs, a rewriting one is refused."""
    seen = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
            self.mix = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if self.mix:
                h.register_hook(lambda g: g + g.roll(1, 0))
            else:
                h.register_hook(lambda g: seen.append(float(g.norm())))
            return self.b(torch.tanh(h))

    model = Net()
    clipper = swiftdp.GradClipper(model, 1.0)
    torch.nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.zeros(6, dtype=torch.long)
                                      ).backward()
    assert len(seen) == 1  # read-only: allowed
    model.mix = True  # switched on at a later step
    with pytest.raises(UnsupportedModuleError, match="changed the gradient of an activation"):
        torch.nn.functional.cross_entropy(model(torch.randn(6, 4)),
                                          torch.zeros(6, dtype=torch.long)).backward()
    clipper.remove()
