"""The ghost-or-instantiate choice must not depend on the batch size (review, 2026-12-03).

A cost rule that charged instantiation more once a layer's gradients passed
32 MiB (``B · p · d``) flipped a linear layer from ghost (an upper bound on
each norm, ~1e-4 high in float32) at ``B`` to instantiation at ``B − 1``:
every other example's clip weight moved a little, and B − 1 identical
examples lined those moves up with the removed one, ``‖S(D) − S(D∖j)‖ =
1.166 C`` at ``d = p = 128``, ``T = 72``, ``B = 513``. The rule was reverted;
this is the reviewer's reproducer.
"""

from __future__ import annotations

import torch
from torch import nn

import swiftdp

C = 1e-3


def _clipped_sum(model: nn.Module, x0: torch.Tensor, y0: torch.Tensor, n_same: int,
                 with_opposite: bool) -> torch.Tensor:
    n = n_same + int(with_opposite)
    xs = x0.expand(n, *x0.shape[1:]).clone()
    ys = y0.expand(n, *y0.shape[1:]).clone()
    if with_opposite:
        ys[-1] = -y0[0]
    model.weight.grad = None
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        (model(xs) * ys).sum().backward()
    finally:
        clipper.remove()
    return model.weight.grad.double().clone()


def test_removing_one_example_of_513_moves_the_clipped_sum_by_at_most_c():
    torch.manual_seed(0)
    d, T, B = 128, 72, 513
    model = nn.Linear(d, d, bias=False)
    x0, y0 = torch.randn(1, T, d), torch.randn(1, T, d)
    full = _clipped_sum(model, x0, y0, B - 1, True)
    smaller = _clipped_sum(model, x0, y0, B - 1, False)
    assert (full - smaller).norm().item() <= C * (1 + 1e-5)
