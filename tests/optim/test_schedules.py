"""Noise and clip schedules: the noise, the clipping and the accountant follow each step's value.

* A noise schedule: each step's noise std is σ_t·C (measured), the
  accountant's history is the schedule, and ε equals dp-accounting's
  composition of the heterogeneous steps; a plan over the target is refused.
* A clip schedule: each step's update equals the one-example-at-a-time
  clipped sum at C_t (σ = 0), and the noise std is σ·C_t (measured).
* ``dp.set_max_grad_norm`` between steps moves both; a resume restores the
  scheduled σ and C (bitwise equal to the uninterrupted run).
"""

from __future__ import annotations

import math
import statistics

import dp_accounting as dpa
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.errors import InvalidArgumentError

N, BATCH, LR = 400, 40, 0.5


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, dtype=torch.float64, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def _noise_run(dp, model: nn.Module) -> list[tuple[float, float, list[float]]]:
    """Each step's (σ, C, noise / C): zero gradients, so the update is the noise alone."""
    out = []
    for x, y in dp.data_loader:
        sigma, c = dp.privacy.noise_multiplier, dp.privacy.max_grad_norm
        before = [p.detach().clone() for p in model.parameters()]
        dp.optimizer.zero_grad()
        if len(y):
            (dp.model(x).mean() * 0.0).backward()
        dp.optimizer.step()
        delta = torch.cat([(b - p.detach()).reshape(-1)
                           for b, p in zip(before, model.parameters(), strict=True)])
        out.append((sigma, c, (delta * BATCH / LR / c).tolist()))
    return out


def test_a_noise_schedule_sets_each_steps_noise_and_accounting():
    model = nn.Linear(4, 100).double()
    sched = swiftdp.ExponentialSchedule(2.0, gamma=0.8)
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(_data(), batch_size=BATCH), max_grad_norm=0.7,
                              noise_schedule=sched, steps=10, seed=0, accountant="rdp")
    steps = _noise_run(dp, model)
    assert [s for s, _, _ in steps] == pytest.approx([sched(t) for t in range(10)], rel=1e-15)
    for t, (sigma, _, noise) in enumerate(steps):
        ratio = statistics.pstdev(noise) / sigma
        assert abs(ratio - 1) < 5 / math.sqrt(2 * len(noise)), (t, ratio)
    acc = dpa.rdp.RdpAccountant()  # (RDP: PLD of ten different σ takes a minute here)
    for t in range(10):
        acc.compose(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(sched(t))))
    assert dp.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # the schedule's next value is already in force for step 11
    assert dp.privacy.noise_multiplier == pytest.approx(sched(10), rel=1e-15)


def test_a_noise_schedule_over_the_target_is_refused_before_training():
    model = nn.Linear(4, 3).double()
    with pytest.raises(InvalidArgumentError, match="more than target_epsilon=1"):
        swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                             DataLoader(_data(), batch_size=BATCH), max_grad_norm=1.0,
                             noise_schedule=swiftdp.ExponentialSchedule(1.0, 0.95),
                             target_epsilon=1.0, steps=20, accountant="rdp")
    with pytest.raises(InvalidArgumentError, match="Pass one of them"):
        swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                             DataLoader(_data(), batch_size=BATCH), max_grad_norm=1.0,
                             noise_schedule=lambda t: 1.0, noise_multiplier=1.0, steps=2)
    with pytest.raises(InvalidArgumentError, match=r"returned -1\.0 for step 0"):
        swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                             DataLoader(_data(), batch_size=BATCH), max_grad_norm=1.0,
                             noise_schedule=lambda t: -1.0, steps=2)


def test_a_clip_schedule_clips_each_step_to_its_threshold():
    data = _data(40)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref.load_state_dict(model.state_dict())
    sched = swiftdp.StepSchedule(1.0, step_size=2, gamma=0.3)
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(data, batch_size=10), max_grad_norm=1.0,
                              clip_schedule=sched, noise_multiplier=0.0, steps=6, seed=0,
                              loss_reduction="sum")
    for t, (x, y) in zip(range(6), dp.data_loader, strict=False):
        assert dp.privacy.max_grad_norm == pytest.approx(sched(t))
        dp.optimizer.zero_grad()
        if len(y):
            F.cross_entropy(dp.model(x), y, reduction="sum").backward()
            want, _ = reference_clipped_sum(
                ref, lambda o, s: F.cross_entropy(o, s, reduction="sum"), x, y, sched(t))
            with torch.no_grad():
                for p, w in zip(ref.parameters(), want, strict=True):
                    p.sub_(LR * w / 10)
        dp.optimizer.step()
        assert max_rel_error(list(model.parameters()), list(ref.parameters())) < 1e-12, t


def test_the_noise_follows_a_clip_schedule_and_set_max_grad_norm():
    model = nn.Linear(4, 100).double()
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(_data(), batch_size=BATCH), max_grad_norm=2.0,
                              clip_schedule=lambda t: 2.0 / (1 + t), noise_multiplier=1.3,
                              steps=10, seed=0)
    for t, (sigma, c, noise) in enumerate(_noise_run(dp, model)):
        assert c == pytest.approx(2.0 / (1 + t))
        ratio = statistics.pstdev(noise) / sigma  # noise / C_t has std σ
        assert abs(ratio - 1) < 5 / math.sqrt(2 * len(noise)), (t, ratio)
    model2 = nn.Linear(4, 100).double()
    dp2 = swiftdp.make_private(model2, torch.optim.SGD(model2.parameters(), lr=LR),
                               DataLoader(_data(), batch_size=BATCH), max_grad_norm=1.0,
                               noise_multiplier=1.3, steps=10, seed=0)
    dp2.set_max_grad_norm(0.25)
    sigma, c, noise = _noise_run(dp2, model2)[0]
    assert c == 0.25 and dp2.clipper.max_grad_norm == 0.25
    assert abs(statistics.pstdev(noise) / sigma - 1) < 5 / math.sqrt(2 * len(noise))


def test_a_resume_restores_the_scheduled_sigma_and_threshold(tmp_path):
    def build():
        torch.manual_seed(2)
        m = nn.Linear(4, 3).double()
        return m, swiftdp.make_private(
            m, torch.optim.SGD(m.parameters(), lr=LR), DataLoader(_data(80), batch_size=8),
            max_grad_norm=1.0, noise_schedule=swiftdp.ExponentialSchedule(1.5, 0.9),
            clip_schedule=lambda t: 1.0 + 0.1 * t, steps=8, seed=4, accountant="rdp")

    def train(dp, steps: int) -> None:
        it = iter(dp.data_loader)
        for _ in range(steps):
            x, y = next(it)
            dp.optimizer.zero_grad()
            if len(y):
                F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()

    whole, dpw = build()
    train(dpw, 6)
    _, dph = build()
    train(dph, 3)
    dph.save_checkpoint(tmp_path / "c.ckpt")
    resumed, dpr = build()
    dpr.load_checkpoint(tmp_path / "c.ckpt")
    assert dpr.privacy.noise_multiplier == dph.privacy.noise_multiplier
    assert dpr.privacy.max_grad_norm == dph.privacy.max_grad_norm == pytest.approx(1.3)
    train(dpr, 3)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert dpr.epsilon() == dpw.epsilon()


def test_the_threshold_cannot_change_while_clipped_sums_wait_or_a_backward_runs():
    """(Found by review: a state dict loaded between backward and step, or C set from a hook
    during ghost's second pass / nanobatch, gave noise 1000x too small.)"""
    data = _data(40)
    for mode in ("bk", "ghost", "nanobatch"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                                  DataLoader(data, batch_size=10), max_grad_norm=1.0,
                                  noise_multiplier=1.0, steps=4, seed=0, mode=mode)
        x, y = next(iter(dp.data_loader))
        assert len(y)
        out = dp.model(x)
        out.register_hook(lambda g, dp=dp: dp.set_max_grad_norm(1e-3))  # during the backward
        with pytest.raises(Exception, match="cannot change now"):
            F.cross_entropy(out, y).backward()
        assert dp.privacy.max_grad_norm == 1.0, mode
    # a state dict with another C between a backward and its step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(data, batch_size=10), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=4, seed=0)
    for x, y in dp.data_loader:
        if len(y):
            F.cross_entropy(dp.model(x), y).backward()
            break
        dp.optimizer.step()
    state = {**dp.optimizer.state_dict(), "max_grad_norm": 1e-3}
    with pytest.raises(Exception, match="cannot change now"):
        dp.optimizer.load_state_dict(state)
    assert dp.privacy.max_grad_norm == 1.0
