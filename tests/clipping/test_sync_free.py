"""The step without host synchronisation (``GradClipper.sync_free``), checked on the CPU.

A steady-state DP step must queue all its work without reading a value back
(issue 13: the step runs asynchronously on CUDA). :class:`swiftdp.bench.syncs.HostReads`
sees every op that would make the host wait, on the CPU too, so these tests
run the sync-free path here: zero reads per step on the suite's models, the
non-finite example still dropped exactly in the same step (against a float64
one-example-at-a-time reference), its warning arriving later, and the
neighbour sensitivity still at most ``C``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.oracle import reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.bench.models import get_model
from swiftdp.bench.syncs import HostReads
from swiftdp.errors import NonFiniteGradientWarning

C = 1.0


# ------------------------------------------------------------------- the counter
def test_host_reads_sees_value_reads_and_data_dependent_shapes_only():
    x = torch.randn(6)
    with HostReads() as h:
        _ = float(x.sum())
        _ = bool((x > 0).any())
        _ = x[x > 0]
        _ = torch.nonzero(x)
        _ = (x * 2).exp()  # no read
    ops = sorted(op for op, _ in h.counts)
    assert h.total == 4, h.where()
    assert "aten.nonzero.default" in ops and "aten.index.Tensor" in ops
    with HostReads() as h:
        _ = x.tolist()  # host memory, not an op
    assert h.total == 0


# ------------------------------------------------------- zero reads per step
def _suite_step(name: str, mode: str, groups: bool, loss: str):
    spec = get_model(name, "small")
    torch.manual_seed(0)
    model = spec.build().train()
    x, y = spec.make_batch(8, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=8, collate_fn=lambda _: (x, y))
    thresholds = swiftdp.per_layer_thresholds(model, C) if groups else C
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=thresholds,
                                  mode=mode, poisson_sampling=False, seed=0,
                                  loss_reduction="sum" if loss == "sum" else "mean")
    dp.clipper.sync_free = True

    def loss_of(out: Tensor, target: Tensor) -> Tensor:
        if spec.labels_are_inputs:
            out, target = out[:, :-1], target[:, 1:]
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1),
                               reduction="sum" if loss == "sum" else "mean")

    def step(xb: Tensor, yb: Tensor) -> None:
        dp.optimizer.zero_grad(set_to_none=True)
        loss_of(model(xb), yb).backward()
        dp.optimizer.step()

    return dp, step


def _forever(loader):
    while True:
        yield from loader


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "vit", "transformer", "gpt", "lstm"])
def test_steady_state_step_reads_nothing_back(name):
    """Steps 5-7 (no probe, no second-derivative check): no host read at all."""
    dp, step = _suite_step(name, "bk", groups=False, loss="sum")
    batches = _forever(dp.data_loader)
    for _ in range(4):
        step(*next(batches))
    for _ in range(3):
        xb, yb = next(batches)  # torch's DataLoader seeds its iterator on the CPU: not the step
        with HostReads() as h:
            step(xb, yb)
        assert h.total == 0, (name, h.where())


@pytest.mark.parametrize("mode,groups", [("ghost", False), ("per_sample", False), ("bk", True)])
def test_steady_state_step_reads_nothing_back_in_other_modes(mode, groups):
    dp, step = _suite_step("transformer", mode, groups=groups, loss="sum")
    batches = _forever(dp.data_loader)
    for _ in range(4):
        step(*next(batches))
    xb, yb = next(batches)
    with HostReads() as h:
        step(xb, yb)
    assert h.total == 0, (mode, groups, h.where())


@pytest.mark.parametrize("free", [True, False])
def test_a_cross_entropy_mean_reads_its_ignore_index_flag_only_on_the_cpu_path(free):
    """Whether any target equals ignore_index (a token mean over the batch couples
    examples when one does): sync-free, the flag is checked before delivery without a
    read; the CPU path reads it at the loss, and the norms' sum for the non-finite check
    (two reads, free there: nothing is queued ahead of the host on a CPU)."""
    dp, step = _suite_step("mlp", "bk", groups=False, loss="mean")
    dp.clipper.sync_free = free
    batches = _forever(dp.data_loader)
    for _ in range(4):
        step(*next(batches))
    xb, yb = next(batches)
    with HostReads() as h:
        step(xb, yb)
    if free:
        assert h.total == 0, h.where()
    else:
        sites = sorted(site.split(":")[0] for _, site in h.counts)
        assert h.total == 2 and sites == ["clipping/clip_fns.py", "clipping/loss_forms.py"], \
            h.where()


# ------------------------------------------- non-finite examples, sync-free
class _SequenceMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.inp(x)) + self.inp(x))


def _sq_loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).sum()


def _clipped_sum(model: nn.Module, x: Tensor, y: Tensor, mode: str, groups: bool) -> Tensor:
    """The sync-free clipped sum, flattened; asserts the backward read nothing back and
    warned of nothing (a count is read when the clipper is removed, at the end)."""
    for p in model.parameters():
        p.grad = None
    thresholds = {"inp": C / 2**0.5, "out": C / 2**0.5} if groups else C
    # check_loss=False: the first step of a signature checks the loss (reads values)
    clipper = swiftdp.GradClipper(model, thresholds, mode=mode, loss_reduction="sum",
                                  check_loss=False)
    clipper.sync_free = True
    try:
        with HostReads() as h, warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            _sq_loss(model(x), y).backward()
    finally:
        clipper.remove()
    assert not [w for w in rec if issubclass(w.category, NonFiniteGradientWarning)], \
        "a sync-free step must not read the count during its backward"
    # (the rounding constants of new shapes are put on the device once: a cache miss)
    reads = [w for w in h.where() if not ("lift_fresh" in w and "rounding.py" in w)]
    if mode != "nanobatch":  # the per-example loop reads its factors one by one
        assert not reads, reads
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def _bad_batch(bad: str, j: int = 2) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(4)
    model = _SequenceMLP()
    x, y = torch.randn(5, 4, 8), torch.randn(5, 4, 3)
    if bad == "nan":
        x[j, 1, 3] = float("nan")
    else:
        x[j] = 1e38  # finite input, infinite activations and gradients
    return model, x, y


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("bad", ["nan", "huge"])
def test_nonfinite_example_dropped_exactly_without_a_read_and_reported_later(mode, groups, bad):
    j = 2
    model, x, y = _bad_batch(bad, j)
    keep = [i for i in range(5) if i != j]
    with pytest.warns(NonFiniteGradientWarning, match=r"1 of 5 examples of sync-free step"):
        got = _clipped_sum(model, x, y, mode, groups)  # warned at remove(), after the backward
    assert bool(torch.isfinite(got).all()), "a released gradient is not finite"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        others = _clipped_sum(model, x[keep], y[keep], mode, groups)
    assert (got - others).abs().max().item() <= 1e-6 * others.abs().max().item()
    if not groups:
        want, _ = reference_clipped_sum(copy.deepcopy(model).double(), _sq_loss,
                                        x[keep].double(), y[keep].double(), C)
        flat = torch.cat([w.reshape(-1) for w in want])
        assert (got - flat).abs().max().item() <= 1e-5 * flat.abs().max().item()


def test_a_later_step_reports_the_count_of_an_earlier_one():
    model, x, y = _bad_batch("nan")
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum", check_loss=False)
    clipper.sync_free = True
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            _sq_loss(model(x), y).backward()
        assert not rec
        with pytest.warns(NonFiniteGradientWarning, match=r"1 of 5 examples of sync-free step 1"):
            _sq_loss(model(x[1:3]), y[1:3]).backward()  # its clip reads step 1's count
    finally:
        with pytest.warns(NonFiniteGradientWarning, match=r"1 of 2 examples of sync-free step 2"):
            clipper.remove()  # step 2's own count (its second row is the bad one)


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_neighbour_sensitivity_with_poisoned_examples_is_at_most_c(mode):
    """Removing any one example (a NaN one, a huge one, an ordinary one) moves the
    sync-free clipped sum by at most C."""
    model, x, y = _bad_batch("nan", 1)
    x[3] = 1e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        worst = neighbour_sensitivity(
            lambda b: [_clipped_sum(model, b[0], b[1], mode, False)], (x, y), 5)
    assert worst <= C * (1 + 1e-6), worst


# ---------------------------------- cross_entropy mean: ignore_index, deferred
class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.head = nn.Linear(8, 13)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


def _token_step(clipper: swiftdp.GradClipper, model: nn.Module, x: Tensor, y: Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    F.cross_entropy(out.reshape(-1, 13), y.reshape(-1)).backward()


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_a_deferred_ignore_index_flag_refuses_the_step_before_delivery(mode):
    """Sync-free, the ignore_index flag of a cross_entropy mean is not read at the loss
    but before the clipped sums are delivered: a batch with an ignored target (a token
    mean over the batch: coupled) is refused there with nothing added to .grad; a clean
    batch gives the same sums as the step that reads the flag at once, and reads nothing."""
    torch.manual_seed(2)
    x, y = torch.randint(0, 13, (4, 5)), torch.randint(0, 13, (4, 5))
    base = _Tokens()
    want = []
    clip = swiftdp.GradClipper(base, C, mode=mode)
    try:
        for _ in range(3):
            _token_step(clip, base, x, y)
        want = [p.grad.clone() for p in base.parameters()]
    finally:
        clip.remove()
    model = copy.deepcopy(base)
    clip = swiftdp.GradClipper(model, C, mode=mode)
    clip.sync_free = True
    try:
        for _ in range(2):  # the 1st and 2nd steps check the loss (they read values)
            _token_step(clip, model, x, y)
        with HostReads() as h:
            _token_step(clip, model, x, y)  # step 3: no read at all
        assert h.total == 0, h.where()
        for p, w in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=0, atol=0)
        bad = y.clone()
        bad[1, 2] = -100  # one padded target: the mean divides by the other targets' count
        with pytest.raises(swiftdp.errors.ExampleMixingError, match="ignore_index=-100"):
            _token_step(clip, model, x, bad)
        assert all(p.grad is None for p in model.parameters()), "a refused step delivered"
        _token_step(clip, model, x, y)  # the next clean step trains
        assert all(p.grad is not None for p in model.parameters())
    finally:
        clip.remove()


def test_a_deferred_flag_refuses_through_make_private_and_the_step_is_not_taken():
    torch.manual_seed(3)
    model = _Tokens()
    x, y = torch.randint(0, 13, (4, 5)), torch.randint(0, 13, (4, 5))
    bad = y.clone()
    bad[0, 0] = -100
    batches = [(x, y), (x, y), (x, y), (x, bad)]
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=4,
                                         collate_fn=lambda _: batches[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=C,
                                  poisson_sampling=False, seed=0)
    dp.clipper.sync_free = True
    it = _forever(dp.data_loader)
    for b in batches[:3]:
        batches[0] = b
        xb, yb = next(it)
        dp.optimizer.zero_grad()
        F.cross_entropy(model(xb).reshape(-1, 13), yb.reshape(-1)).backward()
        dp.optimizer.step()
    steps = dp.optimizer.steps_taken
    before = [p.detach().clone() for p in model.parameters()]
    batches[0] = (x, bad)
    xb, yb = next(it)
    dp.optimizer.zero_grad()
    with pytest.raises(swiftdp.errors.ExampleMixingError):
        F.cross_entropy(model(xb).reshape(-1, 13), yb.reshape(-1)).backward()
    assert dp.optimizer.steps_taken == steps
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
