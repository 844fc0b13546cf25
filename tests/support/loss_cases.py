"""Shared fixtures of the loss-trace attack tests: small float64 models, batches, and checks.

* :func:`mlp` and :func:`data`: a two-layer MLP and a batch for exactness against
  the one-example-at-a-time reference (:func:`exact`);
* :func:`outputs_are_inputs` and :func:`centre_outlier`: a linear model whose
  outputs are the inputs' first two coordinates, and a batch whose example 0
  points the other way, 100 times larger — it sets the sign of the batch mean,
  so a loss that uses the batch mean moves every other example's clipped
  gradient when example 0 is removed;
* :func:`sensitivity` / :func:`refused_or_bounded`: the neighbour sensitivity
  ``max_j ||S(D) - S(D without j)||`` of one clipped ``loss.backward()`` (or
  ``clipper.backward(losses)``) through :class:`swiftdp.GradClipper`, and the
  correct outcome of an attack: a swiftdp refusal or a sensitivity of at most C.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import SwiftDPError

F64 = torch.float64
B, D, K = 6, 4, 3
C = 0.5
BOUND = C * (1 + 1e-6)
LossFn = Callable[[Tensor, Tensor], Tensor]


def mlp(seed: int = 0) -> nn.Module:
    """A (D → 8 → K) tanh MLP in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def data() -> tuple[Tensor, Tensor]:
    """B random inputs and class labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g, dtype=F64), torch.randint(0, K, (B,), generator=g)


def outputs_are_inputs() -> nn.Module:
    """o_i = (x_i0, x_i1, 0): the outputs are the inputs' first two coordinates."""
    m = nn.Linear(D, K, bias=False).double()
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, 0] = 1.0
        m.weight[1, 1] = 1.0
    return m


def centre_outlier() -> tuple[Tensor, Tensor]:
    """Example 0 points the other way, 100 times larger: it sets the sign of the batch mean."""
    x = torch.zeros(B, D, dtype=F64)
    x[:, 0] = 1.0
    x[0, 0] = -100.0
    return x, torch.zeros(B, dtype=torch.long)


def sensitivity(loss_fn: LossFn, batch: tuple[Tensor, Tensor] | None = None, *,
                make: Callable[[], nn.Module] = outputs_are_inputs, vector: bool = False,
                check: bool = True) -> float:
    """Neighbour sensitivity of the clipped sum of ``loss_fn(make()(x), y)``, ``loss_reduction="sum"``.

    ``vector``: ``clipper.backward(losses)`` instead of ``loss.backward()``;
    ``batch`` defaults to :func:`centre_outlier`.
    """
    def run(b: tuple[Tensor, Tensor]) -> list[Tensor]:
        xs, ys = b
        model = make()
        clipper = swiftdp.GradClipper(model, C, loss_reduction="sum", check_loss=check)
        try:
            loss = loss_fn(model(xs), ys)
            clipper.backward(loss) if vector else loss.backward()
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]
    return neighbour_sensitivity(run, centre_outlier() if batch is None else batch, B)


def refused_or_bounded(loss_fn: LossFn, batch: tuple[Tensor, Tensor] | None = None, *,
                       make: Callable[[], nn.Module] = outputs_are_inputs,
                       vector: bool = False) -> None:
    """The correct outcome of an attack: a swiftdp refusal, or a sensitivity of at most C."""
    try:
        s = sensitivity(loss_fn, batch, make=make, vector=vector)
    except SwiftDPError:
        return
    assert s <= BOUND, f"accepted silently, neighbour sensitivity {s / C:.2f} C"


def exact(loss_fn: LossFn) -> None:
    """``loss_fn`` on :func:`mlp` and :func:`data`: the one-example-at-a-time clipped sum."""
    x, y = data()
    want, _ = reference_clipped_sum(mlp(), loss_fn, x, y, C)
    model = mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        loss_fn(model(x), y).backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9
