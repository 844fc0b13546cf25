"""A batch merged into the rows by a reshape (OPT's ``hidden.reshape(-1, d)``).

The batch is followed through reshapes: ``(B, T, d) -> (B * T, d)`` keeps it
in dimension 0 with ``T`` rows per example (examples outermost), and a row-wise
layer on it (linear, layer norm, embedding) is clipped per example exactly,
against the one-example-at-a-time reference in float64. A merge that puts the
examples innermost mixes them in every row and is refused by the next layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import UnsupportedModuleError

C = 0.05
B, T, D = 3, 4, 5


class Merged(nn.Module):
    def __init__(self, order: str = "batch_outer") -> None:
        super().__init__()
        self.inp = nn.Linear(D, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.emb = nn.Embedding(10, 8)
        self.order = order

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = self.inp(x) + self.emb(ids)  # (B, T, 8)
        shape = h.shape
        if self.order == "batch_outer":
            flat = h.reshape(-1, h.shape[-1])  # (B * T, 8): rows b*T .. b*T + T - 1 are example b
        else:  # tokens outermost: each block of B rows mixes the examples
            flat = h.transpose(0, 1).reshape(-1, h.shape[-1])
        out = flat + self.fc(torch.relu(self.norm(flat)))
        out = out.view(shape) if self.order == "batch_outer" else out.view(T, B, -1).transpose(0, 1)
        flat_ids = ids.flatten()  # an embedding on merged indices too
        return out + self.emb(flat_ids).view(shape)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, D, dtype=torch.float64, generator=g),
            torch.randint(0, 10, (B, T), generator=g))


def _loss(out: Tensor, _y: object = None) -> Tensor:
    return out.pow(2).sum()


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
def test_row_wise_layers_on_a_merged_batch_are_exact(mode):
    torch.manual_seed(0)
    model = Merged().double()
    x, ids = _data()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, (x, ids), None, C,
                                    call=lambda m, a: m(*a))
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
    try:
        _loss(model(x, ids)).backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9


def test_a_merged_batch_keeps_the_neighbour_sensitivity_within_c():
    torch.manual_seed(0)
    base = Merged().double()

    def clipped_sum(data: tuple[Tensor, Tensor]) -> list[Tensor]:
        model = copy.deepcopy(base)
        clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
        try:
            _loss(model(*data)).backward()
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]

    assert neighbour_sensitivity(clipped_sum, _data(), B) <= C * (1 + 1e-9)


def test_examples_merged_innermost_are_refused():
    torch.manual_seed(0)
    model = Merged("tokens_outer").double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        with pytest.raises(UnsupportedModuleError, match="`norm`"):
            _loss(model(*_data())).backward()
    finally:
        clipper.remove()
