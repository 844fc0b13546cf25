"""A value computed from the outputs without gradient must not couple the examples.

``o.detach()``, ``o.data``, ``torch.no_grad()`` and integer results (an
argmax) are constants to autograd, so the second-derivative check cannot see
them: ``cross_entropy(o - o.detach().mean(0), y)`` makes every example's
gradient depend on the other examples' outputs while each term's derivative
stays its own. The loss trace follows such values while the step's loss is
still to come and refuses one reduced over the batch when it enters the loss
(per-example ones — pseudo-labels, distillation targets, confidence masks,
focal weights — are targets and weights, as labels are). Held to the
neighbour-sensitivity bound (float64) and, for the accepted losses, to the
one-example-at-a-time reference.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.loss_cases import F64, B, C, D, K, LossFn, sensitivity
from support.loss_cases import data as _data
from support.loss_cases import exact as _exact
from support.loss_cases import mlp as _mlp
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.errors import ExampleMixingError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ce_none(o: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(o, y, reduction="none")


def _no_grad_centre(o: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        m = o.mean(0)
    return F.cross_entropy(o - m, y)


# Each makes example i's term depend on the other examples' outputs through a value
# autograd treats as a constant (scalar losses, loss.backward()).
COUPLING: list[tuple[str, LossFn]] = [
    ("minus the detached batch mean", lambda o, y: F.cross_entropy(o - o.detach().mean(0), y)),
    ("under no_grad", _no_grad_centre),
    ("out.data", lambda o, y: F.cross_entropy(o - o.data.mean(0), y)),
    ("scaled by the detached batch norm", lambda o, y: F.cross_entropy(o / o.detach().norm(), y)),
    ("weighted by the batch's std", lambda o, y: F.cross_entropy(o, y) * o.detach().std()),
    ("weighted by the batch accuracy", lambda o, y: F.cross_entropy(o, y) * (
        o.argmax(1) == y).double().mean()),
    ("another example's detached row", lambda o, y: F.cross_entropy(
        o + o.detach().roll(1, 0), y)),
    ("reattached with requires_grad_", lambda o, y: F.cross_entropy(
        o - o.detach().mean(0).requires_grad_(), y)),
    ("a batch-wide softmax target", lambda o, y: F.cross_entropy(
        o, o.detach().softmax(0))),
]


@pytest.mark.parametrize(("case", "loss_fn"), COUPLING, ids=[c[0] for c in COUPLING])
def test_a_detached_batch_statistic_in_the_loss_is_refused(case, loss_fn):
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        with pytest.raises(ExampleMixingError, match="couples the examples"):
            loss_fn(model(x), y).backward()
    finally:
        clipper.remove()
    assert all(p.grad is None for p in model.parameters()), "a refused backward delivered"


@pytest.mark.parametrize(("case", "loss_fn"), [
    ("minus the detached batch mean", lambda o, y: _ce_none(o - o.detach().mean(0), y)),
    ("weighted by the detached batch norm", lambda o, y: _ce_none(o, y) * o.detach().norm()),
    ("another example's detached row", lambda o, y: _ce_none(o + o.detach().roll(1, 0), y)),
], ids=["mean", "norm", "roll"])
def test_per_example_losses_with_a_detached_batch_statistic_are_refused(case, loss_fn):
    # dp.backward(losses) checks each entry's first derivative: blind to a constant
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        with pytest.raises(ExampleMixingError, match="couples the examples"):
            clipper.backward(loss_fn(model(x), y))
    finally:
        clipper.remove()


def _sensitivity(loss_fn: LossFn, check: bool) -> float:
    return sensitivity(loss_fn, make=_linear, check=check)  # (batch: support's centre_outlier)


def _linear() -> nn.Module:
    m = nn.Linear(D, K, bias=False).double()
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, 0] = 1.0
    return m


def test_the_detached_batch_mean_leaks_without_the_check():
    # What the refusal prevents. Each example's term o_i . m, with m the detached batch
    # mean: example 0 flips m's sign, so removing it flips every other example's clipped
    # gradient. Measured 9.0 C with the check off; the same term against each example's
    # own detached output, o_i . o_i.detach(), stays within C (and is accepted).
    def coupled(o: Tensor, y: Tensor) -> Tensor:
        return (o * o.detach().mean(0)).sum()

    def own(o: Tensor, y: Tensor) -> Tensor:
        return (o * o.detach()).sum()

    assert _sensitivity(coupled, check=False) > 8 * C
    assert _sensitivity(own, check=True) <= C * (1 + 1e-9)
    with pytest.raises(ExampleMixingError, match="couples the examples"):
        _sensitivity(coupled, check=True)


def _logged_first(o: Tensor, y: Tensor) -> Tensor:
    _acc = (o.argmax(1) == y).double().mean().item()  # logging before the backward
    _seen = o.detach().norm()
    return F.cross_entropy(o, y)


PER_EXAMPLE: list[tuple[str, LossFn]] = [
    ("pseudo-labels", lambda o, y: F.cross_entropy(o, o.detach().argmax(1))),
    ("self-distillation", lambda o, y: F.kl_div(
        o.log_softmax(1), o.detach().softmax(1) * 0.9 + 0.1 / K, reduction="batchmean")),
    ("confidence mask", lambda o, y: (_ce_none(o, y) * (
        o.detach().softmax(1).amax(1) > 0.3).double()).mean()),
    ("focal weight, detached", lambda o, y: ((1 - o.softmax(1).gather(1, y[:, None]).detach())
                                             ** 2 * _ce_none(o, y)[:, None]).mean()),
    ("centred on its own outputs", lambda o, y: F.cross_entropy(
        o - o.detach().mean(1, keepdim=True), y)),
    ("zeros_like target", lambda o, y: F.mse_loss(o, torch.zeros_like(o))),
    ("where on a detached mask", lambda o, y: torch.where(
        o.detach().amax(1) > 0, _ce_none(o, y), 2 * _ce_none(o, y)).mean()),
    ("a detached constant added", lambda o, y: F.cross_entropy(o, y) + o.detach().mean()),
    ("logged before the backward", _logged_first),
]


@pytest.mark.parametrize(("case", "loss_fn"), PER_EXAMPLE, ids=[c[0] for c in PER_EXAMPLE])
def test_per_example_detached_targets_masks_and_weights_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


def test_a_detached_output_carried_into_the_next_step_is_refused():
    # A state carried across batches (truncated-BPTT style, the previous step's detached
    # output fed to the next forward, here through an op outside the model) holds other
    # examples' data under Poisson sampling: refused at the step it enters. Saving it and
    # logging with it work.
    x, y = _data()
    model = nn.Sequential(nn.Linear(D + K, 8), nn.Tanh(), nn.Linear(8, K)).double()
    clipper = swiftdp.GradClipper(model, C)
    try:
        out = model(torch.cat([x, torch.zeros(B, K, dtype=F64)], 1))
        carry = out.detach()
        F.cross_entropy(out, y).backward()
        _ = float(carry.norm())  # logging
        buf = io.BytesIO()
        torch.save(carry, buf)  # saves as the plain tensor it holds
        buf.seek(0)
        assert type(torch.load(buf)) is Tensor
        out = model(torch.cat([x, carry], 1))
        with pytest.raises(ExampleMixingError, match="earlier step's outputs"):
            F.cross_entropy(out, y).backward()
        # started afresh, the next batch trains
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(torch.cat([x, torch.zeros(B, K, dtype=F64)], 1)), y).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        clipper.remove()


def test_a_deep_copy_of_the_model_is_a_plain_model():
    # an EMA teacher copied between a forward and its backward, and used after it
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        out = model(x)
        teacher = copy.deepcopy(model)
        F.cross_entropy(out, y).backward()
        want, _ = reference_clipped_sum(_mlp(), lambda o, t: F.cross_entropy(o, t), x, y, C)
        assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9
        # the copy trains as plain PyTorch: full-batch gradients, no clipping, no step
        t_out = teacher(x)
        assert type(t_out) is Tensor
        F.cross_entropy(t_out, y).backward()
        plain = _mlp()
        F.cross_entropy(plain(x), y).backward()
        assert max_rel_error([p.grad for p in teacher.parameters()],
                             [p.grad for p in plain.parameters()]) < 1e-12
    finally:
        clipper.remove()
