"""A loss that changes from one step to the next is checked at the step it changes.

A coupling term a loop adds only from some step on (a regulariser switched
on late) used to pass unchecked after the first step: the pipeline review
measured a neighbour sensitivity of 1.37·C with it; then it was refused at
the next power-of-two step. The outputs are now traced at every step, so it
is refused at the step it is switched on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import ExampleMixingError, InvalidArgumentError


@pytest.mark.parametrize(("switch_on", "refused_at"), [(1, 1), (2, 2), (4, 4), (5, 5), (9, 9)])
def test_a_coupling_term_switched_on_later_is_refused(switch_on, refused_at):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = TensorDataset(torch.randn(200, 4), torch.randint(0, 3, (200,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(data, batch_size=20), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=12, seed=0)
    refused = None
    for step, (x, y) in enumerate(dp.data_loader):
        dp.optimizer.zero_grad()
        out = dp.model(x)
        loss = F.cross_entropy(out, y)
        if step >= switch_on:  # centring penalty: couples every example with the batch mean
            loss = loss + 0.1 * (out - out.mean(0)).pow(2).sum(1).mean()
        try:
            loss.backward()
        except (ExampleMixingError, InvalidArgumentError):
            refused = step
            break
        dp.optimizer.step()
    assert refused == refused_at


@pytest.mark.parametrize("scale", ["python", "tensor", "reciprocal_tensor"])
def test_a_mean_written_as_a_product_with_one_over_b_is_seen_as_a_mean(scale):
    """(Review: ``loss * (1/len(y))`` under loss_reduction='sum' was accepted: 1.8 C.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    clipper = swiftdp.GradClipper(model, 1.0, loss_reduction="sum")
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ce = F.cross_entropy(model(x), y, reduction="sum")
    factor = {"python": 1 / len(y), "tensor": torch.tensor(1 / len(y)),
              "reciprocal_tensor": 1 / torch.tensor(float(len(y)))}[scale]
    with pytest.raises(InvalidArgumentError, match="loss_reduction"):
        (ce * factor).backward()
    clipper.remove()
