"""Under make_private a step sees one logical batch, each example once, and one σ.

Every case is ordinary user code that would let one example contribute more
than C to an accounted step, a σ the accountant does not see, or an update
outside the accounting. Each is refused with a named error before anything
changes, or made harmless by construction (the un-noised clipped sums never
sit in ``p.grad``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import GradientEscapeError, InvalidArgumentError, StepStructureError


def _setup(n: int = 40, batch: int = 10, sigma: float = 1.0, **kw):
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,)))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=batch), noise_multiplier=sigma,
                              max_grad_norm=1.0, seed=1, delta=1e-3, **kw)
    return dp, model, opt, ds


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(before: list[torch.Tensor], model: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_clipped_sums_never_sit_in_grad_between_backward_and_step():
    dp, model, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    F.cross_entropy(dp.model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # nothing to read or rescale


def test_rescaling_grad_between_backward_and_step_changes_nothing_private():
    results = []
    for tamper in (False, True):
        dp, model, _, _ = _setup()
        x, y = next(iter(dp.data_loader))
        F.cross_entropy(dp.model(x), y).backward()
        if tamper:
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e6)  # would be 1e6 C without the private buffer
        dp.optimizer.step()
        results.append(_params(model))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_stepping_the_original_optimizer_is_refused():
    dp, model, opt, _ = _setup()
    x, y = next(iter(dp.data_loader))
    F.cross_entropy(dp.model(x), y).backward()
    before = _params(model)
    with pytest.raises(StepStructureError, match=r"dp.optimizer.step\(\)"):
        opt.step()
    assert _unchanged(before, model)
    dp.optimizer.step()  # the DP step still works afterwards
    assert dp.steps == 1


def test_two_backwards_before_a_step_are_refused():
    dp, _, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    F.cross_entropy(dp.model(x), y).backward()
    with pytest.raises(StepStructureError, match="same examples"):
        F.cross_entropy(dp.model(x), y).backward()


def test_accumulating_over_two_logical_batches_is_refused():
    dp, _, _, _ = _setup()
    it = iter(dp.data_loader)
    x, y = next(it)
    F.cross_entropy(dp.model(x), y).backward()
    with pytest.raises(StepStructureError, match="max_physical_batch_size"):
        next(it)
    # the same through a second iterator (a new epoch): refused at the draw too
    with pytest.raises(StepStructureError, match="max_physical_batch_size"):
        next(iter(dp.data_loader))
    assert dp.steps == 0


def test_a_batch_already_stepped_cannot_be_stepped_again():
    dp, _, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    F.cross_entropy(dp.model(x), y).backward()
    dp.optimizer.step()
    with pytest.raises(StepStructureError, match="already"):
        F.cross_entropy(dp.model(x), y).backward()
    with pytest.raises(StepStructureError, match="already"):
        dp.optimizer.step()
    assert dp.steps == 1


def test_a_drawn_batch_must_be_stepped_before_the_next_is_drawn():
    dp, _, _, _ = _setup()
    with pytest.raises(StepStructureError, match="previous one"):
        for _x, _y in dp.data_loader:
            continue  # skipping steps (e.g. on empty batches) is refused


def test_model_called_twice_in_one_backward_is_refused():
    dp, _, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    with pytest.raises(StepStructureError, match="2 forward passes"):
        (F.cross_entropy(dp.model(x), y) + F.cross_entropy(dp.model(x), y)).backward()


def test_manual_micro_batches_are_refused():
    dp, _, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    k = len(x) // 2
    with pytest.raises(StepStructureError, match="micro-batches"):
        F.cross_entropy(dp.model(x[:k]), y[:k]).backward()


def test_a_batch_not_from_dp_data_loader_is_refused():
    dp, _, _, ds = _setup()
    x, y = ds.tensors[0][:10], ds.tensors[1][:10]
    with pytest.raises(StepStructureError, match=r"did not come from dp\.data_loader"):
        F.cross_entropy(dp.model(x), y).backward()


def test_a_logical_batch_abandoned_half_way_is_refused_at_the_step():
    dp, model, _, _ = _setup(batch=20, max_physical_batch_size=4)
    it = iter(dp.data_loader)
    x, y = next(it)  # first chunk of the first logical batch
    F.cross_entropy(dp.model(x), y).backward()
    dp.optimizer.step()  # mid logical batch: deferred
    assert dp.steps == 0
    x, y = next(it)
    before = _params(model)
    with pytest.raises(StepStructureError):
        dp.optimizer.step()  # this chunk's backward never ran
    assert _unchanged(before, model) and dp.steps == 0


def test_model_forward_under_make_private_is_refused():
    dp, _, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    with pytest.raises(StepStructureError, match="forward passes"):
        F.cross_entropy(dp.model.forward(x), y).backward()  # each child is its own forward


def test_a_trainable_parameter_only_the_optimizer_holds_is_refused():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,)))
    model = nn.Linear(6, 3)
    temperature = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    with pytest.raises(InvalidArgumentError, match="not parameters of `model`"):
        swiftdp.make_private(model, opt, DataLoader(ds, batch_size=5), noise_multiplier=1.0,
                             max_grad_norm=1.0, delta=1e-3)


def test_a_parameter_used_in_the_loss_is_refused_and_nothing_is_applied():
    dp, model, _, _ = _setup()
    x, y = next(iter(dp.data_loader))
    with pytest.raises(GradientEscapeError, match=r"`2\.weight`"):
        (F.cross_entropy(dp.model(x), y) + model[2].weight.pow(2).sum()).backward()


def test_parameter_unfrozen_after_make_private_is_noised_and_clipped():
    torch.manual_seed(0)
    ds = TensorDataset(torch.zeros(40, 6, dtype=torch.float64), torch.zeros(40, 3, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 3)).double()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=10), noise_multiplier=2.0,
                              max_grad_norm=1.0, seed=0, delta=1e-3)
    model[0].requires_grad_(True)  # unfrozen after make_private
    before = _params(model)
    x, y = next(iter(dp.data_loader))
    F.mse_loss(dp.model(x), y).backward()
    dp.optimizer.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert all(moved)  # noise reached the unfrozen layer too
    model[1].requires_grad_(False)  # frozen after make_private: no longer updated
    w1 = model[1].weight.detach().clone()
    x, y = next(iter(dp.data_loader))
    F.mse_loss(dp.model(x), y).backward()
    dp.optimizer.step()
    assert torch.equal(w1, model[1].weight)


def test_assigning_the_noise_multiplier_goes_through_the_one_settings_object():
    dp, _, _, _ = _setup(sigma=1.0)
    dp.optimizer.noise_multiplier = 4.0  # the Opacus idiom for a schedule
    assert dp.privacy.noise_multiplier == 4.0 == dp.optimizer.settings.noise_multiplier
    with pytest.raises(AttributeError, match="privacy guarantee"):
        dp.optimizer.max_grad_norm = 10.0
    with pytest.raises(AttributeError, match="privacy guarantee"):
        dp.clipper.max_grad_norm = 10.0
    with pytest.raises(InvalidArgumentError):
        dp.set_noise_multiplier(-1.0)


def test_noise_std_follows_a_schedule_and_the_accountant_records_the_same_sigma():
    torch.manual_seed(0)
    n, d = 50, 400
    ds = TensorDataset(torch.zeros(n, d, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64))
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=10), noise_multiplier=1.0,
                              max_grad_norm=0.5, seed=3, delta=1e-3)
    stds = []
    for sigma in (1.0, 3.0):
        dp.set_noise_multiplier(sigma)
        x, y = next(iter(dp.data_loader))
        w0 = model.weight.detach().clone()
        F.mse_loss(dp.model(x), y).backward()  # zero inputs: the update is the noise alone
        dp.optimizer.step()
        stds.append(float((w0 - model.weight.detach()).std()) * 10.0 / 0.5)
    recorded = [seg.noise_multiplier for seg in dp.accountant.history]
    assert recorded == [1.0, 3.0]
    for got, want in zip(stds, recorded, strict=True):
        assert abs(got - want) < 5 * want / math.sqrt(2 * d)
