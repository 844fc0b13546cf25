"""make_private end to end: equivalences with non-private training and the oracle, noise, budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import reference_clipped_sum


def _data(n=64, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_no_noise_no_clipping_equals_non_private_training():
    ds = _data()
    m_ref, m_dp = _model(), _model()
    opt_ref = torch.optim.SGD(m_ref.parameters(), lr=0.1)
    opt_dp = torch.optim.SGD(m_dp.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        dp = swiftdp.make_private(
            m_dp, opt_dp, DataLoader(ds, batch_size=16, shuffle=False), noise_multiplier=0.0,
            max_grad_norm=math.inf, poisson_sampling=False, seed=0, delta=1e-3,
        )
    for x, y in DataLoader(ds, batch_size=16, shuffle=False):
        opt_ref.zero_grad()
        F.cross_entropy(m_ref(x), y).backward()
        opt_ref.step()
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
    for a, b in zip(m_ref.parameters(), m_dp.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_noise_update_equals_oracle_clipped_mean_over_expected_batch():
    ds = _data(n=40)
    model = _model(1)
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=8), noise_multiplier=0.0,
                              max_grad_norm=0.3, seed=3, delta=1e-3)
    x, y = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    F.cross_entropy(dp.model(x), y).backward()
    dp.optimizer.step()
    sums, _ = reference_clipped_sum(before, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                    x, y, 0.3)
    expected = 8.0  # q·N = 8/40 · 40
    for p0, p1, s in zip(before.parameters(), model.parameters(), sums, strict=True):
        torch.testing.assert_close(p0 - p1, s / expected, rtol=1e-8, atol=1e-12)


def test_physical_batches_give_the_same_update_as_one_logical_batch():
    ds = _data(n=50)
    results = []
    for phys in (None, 3):
        model = _model(2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=20), noise_multiplier=1.0,
                                  max_grad_norm=0.5, seed=11, max_physical_batch_size=phys,
                                  delta=1e-3)
        for i, (x, y) in enumerate(dp.data_loader):
            dp.optimizer.zero_grad()
            F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
            if i > 12:
                break
        results.append([p.detach().clone() for p in model.parameters()])
        assert dp.steps == dp.optimizer.steps_taken
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_noise_std_per_coordinate_is_sigma_c_over_expected_batch_size():
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False).double()
    nn.init.zeros_(model.weight)
    ds = TensorDataset(torch.zeros(100, 200, dtype=torch.float64), torch.zeros(100, 100, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sigma, c = 1.3, 0.7
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=10), noise_multiplier=sigma,
                              max_grad_norm=c, seed=5, delta=1e-3)
    x, y = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    F.mse_loss(dp.model(x), y).backward()  # zero gradients: the update is the noise alone
    dp.optimizer.step()
    delta = -model.weight.detach().flatten()
    want = sigma * c / 10.0
    n = delta.numel()
    # std of the sample std of n normals ≈ σ/√(2n); allow 5 of those
    assert abs(delta.std().item() - want) < 5 * want / math.sqrt(2 * n)
    assert abs(delta.mean().item()) < 5 * want / math.sqrt(n)


def test_budget_error_fires_before_any_parameter_changes():
    ds = _data(n=100)
    model = _model(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=20), target_epsilon=2.0,
                              epochs=1, max_grad_norm=1.0, seed=0, delta=1e-3)
    sigma = dp.privacy.noise_multiplier
    steps = 0
    with pytest.raises(swiftdp.PrivacyBudgetExceededError, match="No parameter was changed"):
        while True:
            for x, y in dp.data_loader:
                dp.optimizer.zero_grad()
                F.cross_entropy(dp.model(x), y).backward()
                snapshot = [p.detach().clone() for p in model.parameters()]
                eps_before = dp.epsilon()
                dp.optimizer.step()
                steps += 1
    assert steps == len(dp.data_loader)  # exactly the planned steps fit the budget
    for a, b in zip(snapshot, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert dp.epsilon() == eps_before <= 2.0
    assert sigma > 0


def test_empty_logical_batch_is_a_noise_only_step():
    ds = _data(n=30)
    model = _model(4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=1), noise_multiplier=1.0,
                              max_grad_norm=1.0, seed=0, delta=1e-3, loss_reduction="sum")
    seen_empty = 0
    for x, y in dp.data_loader:  # q = 1/30: about a third of the batches are empty
        before = [p.detach().clone() for p in model.parameters()]
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y, reduction="sum").backward()
        dp.optimizer.step()
        if len(x) == 0:
            seen_empty += 1
            assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert seen_empty > 0
    assert dp.steps == 30


def test_adam_and_lr_scheduler_keep_working():
    ds = _data(n=60)
    model = _model(5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=10), noise_multiplier=0.8,
                              max_grad_norm=1.0, seed=0, delta=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(dp.optimizer, step_size=1, gamma=0.5)
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** len(dp.data_loader))
    assert len(opt.state) > 0
