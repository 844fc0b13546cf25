"""``make_private(cost_objective=...)`` reaches the engine and changes only speed and memory."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from swiftdp.errors import InvalidArgumentError


def _run(model: nn.Module, objective: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(6, 12, 16), torch.randint(0, 4, (6,))
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=6, collate_fn=lambda _: (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=1.0,
                                  poisson_sampling=False, seed=0, cost_objective=objective)
    assert dp.clipper.cost_objective == objective
    for xb, yb in dp.data_loader:
        dp.optimizer.zero_grad()
        F.cross_entropy(model(xb).mean(1), yb).backward()
        dp.optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_every_objective_gives_the_same_update():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))  # T = 12 positions
    want = _run(copy.deepcopy(base), "time")
    for objective in ("memory", "ghost", "instantiate"):
        got = _run(copy.deepcopy(base), objective)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_an_unknown_objective_is_refused_naming_the_argument():
    model = nn.Linear(3, 2)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    with pytest.raises(InvalidArgumentError, match="cost_objective"):
        swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                             noise_multiplier=1.0, max_grad_norm=1.0, cost_objective="fast")
