"""Values computed from parameters without the batch (``swiftdp.clipping.shared``).

A T5-style relative position bias is a ``(T, T)`` lookup, the same for every
example, added to every example's scores. Its per-example gradient is the
pull-back of the example's own row of the broadcast bias: against the
one-example-at-a-time reference in float64, also when ``T`` equals ``B``
(the batch is tracked, never read from a size), with the neighbour
sensitivity of the clipped sum within ``C``. Every way such a value could
carry the whole batch's gradient into an update is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import UnsupportedModuleError

C = 0.05
T = 4
MODES = ["bk", "ghost", "per_sample", "nanobatch"]


class RelBias(nn.Module):
    """Scores plus a relative-position bias looked up with (T, T) indices (no batch)."""

    def __init__(self, how: str = "add") -> None:
        super().__init__()
        self.rel = nn.Embedding(2 * T, 2)
        self.scale = nn.Linear(2, 1, bias=False)  # a layer applied to the batch-free value
        self.q = nn.Linear(4, 4)
        self.how = how

    def bias(self, t: int) -> Tensor:
        idx = torch.arange(t)[None, :] - torch.arange(t)[:, None] + T
        return self.scale(torch.tanh(self.rel(idx))).squeeze(-1)  # (T, T)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ x.transpose(1, 2)  # (B, T, T)
        bias = self.bias(x.shape[1])
        if self.how == "add":
            return scores + bias
        if self.how == "matmul":  # a product over the broadcast dimension only
            return scores @ bias[None]
        if self.how == "mask":  # as Hugging Face builds it: bias + the batch's mask
            return torch.softmax(scores + (bias + torch.zeros_like(scores)), -1)
        raise AssertionError(self.how)


def _loss(out: Tensor, _y: object = None) -> Tensor:
    return out.pow(2).sum()


def _x(batch: int) -> Tensor:
    return torch.randn(batch, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [3, T])  # T == B: a size equal to the batch's proves nothing
@pytest.mark.parametrize("how", ["add", "matmul", "mask"])
def test_a_batch_free_bias_is_clipped_per_example_exactly(mode, batch, how):
    torch.manual_seed(0)
    model = RelBias(how).double()
    x = _x(batch)
    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, x, None, C)
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
    try:
        _loss(model(x)).backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9


def test_a_batch_free_bias_keeps_the_neighbour_sensitivity_within_c():
    torch.manual_seed(0)
    base = RelBias().double()

    def clipped_sum(x: Tensor) -> list[Tensor]:
        model = copy.deepcopy(base)
        clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
        try:
            _loss(model(x)).backward()
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]

    x = _x(T)
    assert neighbour_sensitivity(clipped_sum, x, T) <= C * (1 + 1e-9)


class _Escape(RelBias):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.escape = how

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ x.transpose(1, 2)
        bias = self.bias(x.shape[1])
        if self.escape == "unmet":  # the bias is returned beside the batch, never meets it
            return scores, bias
        if self.escape == "along_batch":  # its rows would be taken for examples
            return scores[:, 0] + bias
        if self.escape == "cat":
            return torch.cat([scores, bias.expand_as(scores)], 1)
        if self.escape == "mix_rows":  # the bias's broadcast rows mixed across examples
            return scores + (bias + torch.zeros_like(scores)).flip(0)
        raise AssertionError(self.escape)


@pytest.mark.parametrize(("how", "match"), [
    ("unmet", "reached the loss without being combined with the batch"),
    ("along_batch", "lies where the batch is"),
    ("cat", "does not broadcast"),
    ("mix_rows", "acts along the batch dimension"),
])
def test_ways_a_batch_free_value_could_carry_the_batch_gradient_are_refused(how, match):
    torch.manual_seed(0)
    model = _Escape(how).double()
    before = [p.detach().clone() for p in model.parameters()]
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum", check_loss=how != "unmet")
    try:
        with pytest.raises(UnsupportedModuleError, match=match):
            out = model(_x(T))
            loss = _loss(out[0]) + out[1].sum() if how == "unmet" else _loss(out)
            loss.backward()
    finally:
        clipper.remove()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_batch_free_value_under_make_private_trains_and_accounts():
    torch.manual_seed(0)
    model = RelBias().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(_x(32), torch.zeros(32))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    dp = swiftdp.make_private(model, opt, loader, epochs=1, noise_multiplier=1.0,
                              max_grad_norm=C, loss_reduction="sum")
    before = [p.detach().clone() for p in model.parameters()]
    for x, _ in dp.data_loader:
        dp.optimizer.zero_grad()
        F.mse_loss(dp.model(x), torch.zeros(()).expand(x.shape[0], T, T), reduction="sum").backward()
        dp.optimizer.step()
        break
    assert not torch.equal(model.rel.weight, before[0])
    assert 0 < dp.epsilon() < float("inf")


class _Laundered(nn.Module):
    """Rows broadcast to the batch, combined with a data-free batched tensor, then moved."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.pos = nn.Embedding(T, 4)
        self.cls = nn.Parameter(torch.randn(1, 4))
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        if self.source == "lookup":  # a (1, T) lookup shared by the batch
            rows = self.pos(torch.arange(x.shape[1])[None])
        else:  # a parameter expanded to the batch
            rows = self.cls.expand(x.shape[0], x.shape[1], 4)
        moved = (rows + torch.zeros_like(x)).flip(0)  # no data in it: only the rows move
        return x + moved


@pytest.mark.parametrize("source", ["lookup", "expand"])
def test_broadcast_rows_cannot_be_moved_against_the_batch_after_meeting_it(source):
    # Measured before the fix: 1.001-1.003 C (each row credited to an example whose
    # data it no longer met).
    model = _Laundered(source).double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        with pytest.raises(UnsupportedModuleError, match="acts along the batch dimension"):
            _loss(model(_x(T))).backward()
    finally:
        clipper.remove()
