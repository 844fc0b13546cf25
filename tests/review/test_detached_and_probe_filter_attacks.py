"""Adversarial review of the loss trace's "detached taint" and the probe's batch-free filter.

Values computed from the outputs without gradient are traced while the step's
loss is pending; the independence probe drops submodule outputs that do not
depend on the data. These tests are ordinary (or slightly adversarial) user
code held to the correct behaviour, float64:

* leaks: a swiftdp refusal (``SwiftDPError``) or a neighbour sensitivity of
  at most ``C`` (:func:`support.sensitivity.neighbour_sensitivity`);
* false refusals: accepted and exact against the one-example-at-a-time
  reference (:func:`support.oracle.reference_clipped_sum`).

Each ``xfail(strict=True)`` records what was measured and whether the
committed code (HEAD) behaved the same; the plain tests are attacks that hold.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.loss_cases import F64, B, C, D, K, LossFn
from support.loss_cases import centre_outlier as _centre_outlier
from support.loss_cases import data as _data
from support.loss_cases import exact as _exact
from support.loss_cases import mlp as _mlp
from support.loss_cases import refused_or_bounded as _refused_or_bounded
from swiftdp.clipping.guard import IndependenceCheck
from swiftdp.errors import ExampleMixingError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ fixtures
def _key_outlier() -> tuple[Tensor, Tensor]:
    """Example 0's output dominates every other example's similarities, in another direction."""
    x = torch.zeros(B, D, dtype=F64)
    x[:, 0] = 1.0
    x[0, 0], x[0, 1] = 100.0, -1000.0
    return x, torch.zeros(B, dtype=torch.long)


def _ce_none(o: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(o, y, reduction="none")


# ============================== 1. leaks: in place through a detached alias of the output
def _centred_in_place(o: Tensor, y: Tensor) -> Tensor:
    m = o.detach()  # shares o's storage: centring it centres o itself
    m -= m.mean(0)
    return F.cross_entropy(o, y, reduction="sum")


def _centred_through_data(o: Tensor, y: Tensor) -> Tensor:
    o.data.sub_(o.data.mean(0))
    return F.cross_entropy(o, y, reduction="sum")


def _copied_into_a_view(o: Tensor, y: Tensor) -> Tensor:
    o2 = o * 1.0
    o2.detach().copy_(o.detach() - o.detach().mean(0))
    return F.cross_entropy(o2, y, reduction="sum")


IN_PLACE = [("m = o.detach(); m -= m.mean(0)", _centred_in_place),
            ("o.data.sub_(o.data.mean(0))", _centred_through_data),
            ("o2.detach().copy_(centred)", _copied_into_a_view)]


# fixed (was a strict xfail; measured: 6.0 C accepted (same with check_loss=False), pre-
# existing (HEAD: 6.0 C). The in-place op tags the detached alias `coupled`, but the output it
# shares storage with keeps its `rows` form and its version bump is never read; the second-
# derivative check sees a per-example loss at the (already centred) values)
@pytest.mark.parametrize(("case", "loss_fn"), IN_PLACE, ids=[c[0] for c in IN_PLACE])
def test_an_output_centred_in_place_through_a_detached_alias_is_refused(case, loss_fn):
    _refused_or_bounded(loss_fn, _centre_outlier())


# fixed (was a strict xfail; measured: 6.0 C accepted on the per-example path
# (dp.backward(losses)), pre-existing)
def test_per_example_losses_of_an_output_centred_in_place_are_refused():
    def losses(o: Tensor, y: Tensor) -> Tensor:
        m = o.detach()
        m -= m.mean(0)
        return _ce_none(o, y)
    _refused_or_bounded(losses, _centre_outlier(), vector=True)


def test_centring_the_output_in_place_under_no_grad_is_refused():
    # held (new; HEAD accepted it): the in-place result is the output itself, with grad
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        o = model(x)
        with torch.no_grad():
            o -= o.mean(0)
        with pytest.raises(ExampleMixingError, match="couples the examples"):
            F.cross_entropy(o, y).backward()
    finally:
        clipper.remove()


# ============== 2. leaks: a detached value with rows of ANOTHER layout pairs the examples
# (in-batch negatives with a stop-gradient on the keys: MoCo/BYOL-style contrastive terms)
def _infonce_linear(o: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(o, o.detach()), torch.arange(o.shape[0]), reduction="sum")


def _lse_linear(o: Tensor, y: Tensor) -> Tensor:
    return F.linear(o, o.detach()).logsumexp(1).sum()


def _cosine_pairs(o: Tensor, y: Tensor) -> Tensor:
    return F.cosine_similarity(o[:, None], o.detach()[None], dim=-1).logsumexp(1).sum()


SCALAR_PAIRS = [("cross_entropy(F.linear(o, o.detach()), arange(B))", _infonce_linear),
                ("F.linear(o, o.detach()).logsumexp(1).sum()", _lse_linear),
                ("cosine_similarity(o[:, None], o.detach()[None])", _cosine_pairs)]


# fixed (was a strict xfail; measured: accepted on loss.backward() with 5.0 C, 6.85 C and 1.24
# C, pre-existing (HEAD the same). The `linear` rule reads only its input's form and the
# cosine_similarity rule only x1's, so the detached operand's rows (along another axis: other
# examples' outputs) pass _detached_entering as 'per-example rows' and the result reads as
# rows)
@pytest.mark.parametrize(("case", "loss_fn"), SCALAR_PAIRS, ids=[c[0] for c in SCALAR_PAIRS])
def test_a_loss_against_other_examples_detached_outputs_is_refused(case, loss_fn):
    _refused_or_bounded(loss_fn, _key_outlier())


VECTOR_PAIRS = [
    ("(o @ o.detach().t()).logsumexp(1)", lambda o, y: (o @ o.detach().t()).logsumexp(1)),
    ("einsum('ik,jk->ij', o, o.detach())", lambda o, y: torch.einsum(
        "ik,jk->ij", o, o.detach()).logsumexp(1)),
    ("cdist(o, o.detach()).sum(1)", lambda o, y: torch.cdist(o, o.detach()).sum(1)),
]


# fixed (was a strict xfail; measured: accepted on dp.backward(losses) with 6.85 C, 6.85 C and
# 6.0 C (the key outlier), pre-existing (HEAD the same; loss.backward() of the matmul one is
# now refused). The detached operand is 'rows' so it passes _detached_entering, the result is
# `unknown`, which the per-example path lets through, and the first-derivative check cannot
# see a constant)
@pytest.mark.parametrize(("case", "loss_fn"), VECTOR_PAIRS, ids=[c[0] for c in VECTOR_PAIRS])
def test_per_example_losses_against_other_examples_detached_outputs_are_refused(case, loss_fn):
    _refused_or_bounded(loss_fn, _key_outlier(), vector=True)


# ============================================= 3. detached batch statistics: what holds
HELD: list[tuple[str, LossFn]] = [
    ("torch.max(o.detach(), 0) tuple", lambda o, y: _ce_none(o - torch.max(o.detach(), 0)[0], y)),
    ("sort along the batch", lambda o, y: _ce_none(o * o.detach().sort(0).values, y)),
    ("index_select other rows", lambda o, y: _ce_none(o + o.detach().index_select(
        0, torch.tensor([1, 2, 3, 4, 5, 0])), y)),
    ("tensor-index other rows", lambda o, y: _ce_none(o + o.detach()[
        torch.tensor([1, 2, 3, 4, 5, 0])], y)),
    ("scatter along the batch", lambda o, y: _ce_none(o + torch.zeros_like(o).scatter(
        0, torch.ones(B, K, dtype=torch.long), o.detach()), y)),
    ("o @ o.detach().T", lambda o, y: (o @ o.detach().T).logsumexp(1)),
    ("normalize(dim=0)", lambda o, y: _ce_none(o * F.normalize(o.detach(), dim=0), y)),
    ("through a Python list", lambda o, y: _ce_none(o - sum(list(o.detach())) / B, y)),
    ("where on a batch-wide condition", lambda o, y: torch.where(
        o.detach().mean() > 0, _ce_none(o, y), 2 * _ce_none(o, y))),
    ("median over the batch", lambda o, y: _ce_none(o - o.detach().median(0).values, y)),
]


@pytest.mark.parametrize(("case", "loss_fn"), HELD, ids=[c[0] for c in HELD])
def test_a_detached_value_from_other_examples_is_refused_on_the_vector_path(case, loss_fn):
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        with pytest.raises(ExampleMixingError, match="couples the examples"):
            clipper.backward(loss_fn(model(x), y))
    finally:
        clipper.remove()


def test_a_detached_batch_mean_through_make_private_is_refused():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(list(range(B)), batch_size=B,
                                         collate_fn=lambda idx: (x[idx], y[idx]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=C,
                                  poisson_sampling=False, seed=0)
    for xb, yb in dp.data_loader:
        dp.optimizer.zero_grad()
        o = model(xb)
        with pytest.raises(ExampleMixingError, match="couples the examples"):
            F.cross_entropy(o - o.detach().mean(0), yb).backward()


# ======================= 4. false refusals of per-example losses (regressions vs. HEAD)
def _topk_mask(o: Tensor, y: Tensor) -> Tensor:
    top = o.detach().topk(2, dim=1).indices
    mask = torch.zeros_like(o).scatter(1, top, 1.0)  # each example's own top-2 classes
    return (_ce_none(o, y) * mask.sum(1)).mean()


def _rolled_classes_target(o: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(o, o.detach().roll(1, 1))  # along the classes, not the batch


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 3.0], dtype=F64)


def _weight_of_predicted_class(o: Tensor, y: Tensor) -> Tensor:
    return (_ce_none(o, y) * CLASS_WEIGHTS[o.detach().argmax(1)]).mean()


FALSE_REFUSALS = [
    ("scatter of the own top-k (dim=1)", _topk_mask,
     "scatter is not modelled: a detached per-example scatter along dim 1 is `unknown`"),
    ("roll along the classes", _rolled_classes_target,
     "roll is not modelled, whatever its dims"),
    ("class weight of the predicted class", _weight_of_predicted_class,
     "plain_table[traced_index] goes to _reversed: `unknown` for __getitem__"),
]


@pytest.mark.parametrize(
    ("case", "loss_fn"),
    # fixed (were strict xfails: refused after the detached taint landed, each `why`;
    # accepted and exact before it)
    [pytest.param(c, f) for c, f, _why in FALSE_REFUSALS],
    ids=[c[0] for c in FALSE_REFUSALS])
def test_per_example_weights_from_own_detached_outputs_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


PER_EXAMPLE_HELD: list[tuple[str, LossFn]] = [
    ("topk values (dim=1)", lambda o, y: F.cross_entropy(
        o - o.detach().topk(2, 1).values[:, :1], y)),
    ("sort indices as pseudo-labels", lambda o, y: F.cross_entropy(
        o, o.detach().sort(1, descending=True).indices[:, 0])),
    ("FixMatch confidence mask", lambda o, y: (F.cross_entropy(
        o, o.detach().softmax(-1).max(1).indices, reduction="none")
        * o.detach().softmax(-1).max(1).values.ge(0.3).double()).mean()),
    ("margin weight", lambda o, y: (_ce_none(o, y) * (
        o.detach().sort(1).values[:, -1] - o.detach().sort(1).values[:, -2])).mean()),
    ("EMA-style soft target", lambda o, y: F.cross_entropy(
        o, 0.9 * o.detach() + 0.1 * F.one_hot(y, K).double())),
    ("entropy weight", lambda o, y: (_ce_none(o, y) * -(
        o.detach().softmax(1) * o.detach().log_softmax(1)).sum(1)).mean()),
    ("take_along_dim of argsort", lambda o, y: -torch.take_along_dim(
        o.log_softmax(1), o.detach().argsort(1)[:, -1:], dim=1).mean()),
    ("stack of own detached views", lambda o, y: F.mse_loss(
        o, torch.stack([o.detach(), 2 * o.detach()], 1).mean(1))),
]


@pytest.mark.parametrize(("case", "loss_fn"), PER_EXAMPLE_HELD,
                         ids=[c[0] for c in PER_EXAMPLE_HELD])
def test_per_example_detached_targets_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


# ============================== 5. ordinary code around the detached values
# (was a strict xfail: refused at delivery with a misleading message, the loss tagged
# with the finished step's context.) A value kept from another step's forward holds
# other examples under Poisson sampling: refused, saying so.
def test_a_previous_chunk_output_in_the_loss_is_refused_as_another_steps():
    # truncated BPTT over the same sequences: a smoothness term to the previous chunk
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        o = model(x)
        prev = o.detach()  # kept before the backward
        F.cross_entropy(o, y).backward()
        o = model(x)
        with pytest.raises(ExampleMixingError, match="earlier step's outputs"):
            ((prev - o) ** 2).sum(1).mean().backward()
    finally:
        clipper.remove()


def test_logging_numpy_deepcopy_and_save_of_detached_values_work():
    x, y = _data()
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    try:
        o = model(x)
        d = o.detach()
        arr = d.cpu().numpy()
        preds = [d.argmax(1)]
        assert type(copy.deepcopy(d)) is Tensor
        buf = io.BytesIO()
        torch.save({"o": d.mean(0)}, buf)
        buf.seek(0)
        assert type(torch.load(buf)["o"]) is Tensor
        if (d.abs() > 1e6).any():  # a bool of a detached value
            raise AssertionError
        F.cross_entropy(o, y).backward()
        assert arr.shape == (B, K)
        assert float((torch.cat(preds) == y).double().mean()) >= 0.0
        assert all(p.grad is not None for p in model.parameters())
    finally:
        clipper.remove()


# ============================== 6. the probe's batch-free filter
class _Slots(nn.Module):
    """A learned vector per batch position: data-free, not constant along the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(16, D))

    def forward(self, x: Tensor) -> Tensor:
        return self.p[: x.shape[0]]


class _StraightThroughSlots(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.slots, self.lin = _Slots(), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        c = self.slots(x)
        r = c.roll(1, 0)
        return self.lin(x) * (c + 10 * (r - r.detach()))


def _slots_clipped_sum(xs: Tensor) -> Tensor:
    torch.manual_seed(0)
    model = _StraightThroughSlots().double()
    clipper = swiftdp.GradClipper(model, 1.0)
    check = IndependenceCheck(model, clipper)
    try:
        model(xs).pow(2).sum(1).mean().backward()
    finally:
        clipper.remove()
        check.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_straight_through_on_data_free_slots_is_dropped_by_the_filter_but_bounded():
    # HEAD refused it ("moves gradients ... of `slots`"); the filter now drops the data-free
    # point, but the engine takes `slots.p`'s per-example gradient by recomputing one
    # example at a time, so nothing moves: a substituted example changes the sum by <= 2 C
    # (measured 1.22 C). (With nn.Embedding(arange(B)) slots the engine's batch tracking
    # refuses the model, UnsupportedModuleError.)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, D, generator=g, dtype=F64) * 0.01
    x2 = x.clone()
    x[1] = torch.tensor([100.0, 0, 0, 0], dtype=F64)
    x2[1] = torch.tensor([0, 0, 0, 100.0], dtype=F64)
    assert float((_slots_clipped_sum(x) - _slots_clipped_sum(x2)).norm()) <= 2.0 * (1 + 1e-6)
