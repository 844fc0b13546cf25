"""ParameterAverage in a make_private run: evaluation through applied(), checkpoint and resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp


def _setup(seed=0):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=12), noise_multiplier=1.0,
                              max_grad_norm=1.0, seed=3, delta=1e-3)
    return dp, ds


def _train(dp, avg, steps):
    """``steps`` logical steps, the average updated after each; returns θ after each step."""
    seen = []
    while len(seen) < steps:
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
            avg.update()
            seen.append([p.detach().clone() for p in dp.model.parameters()])
            if len(seen) == steps:
                break
    return seen


def test_evaluating_through_applied_leaves_the_trained_model_unchanged():
    dp, ds = _setup()
    initial = [p.detach().clone() for p in dp.model.parameters()]
    avg = swiftdp.ParameterAverage(dp.model, decay=0.6, warmup=False)
    thetas = _train(dp, avg, 6)
    trained = [p.detach().clone() for p in dp.model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(initial, trained, strict=True))

    # The average of the released iterates, by hand (float32 like the model).
    want = initial
    for theta in thetas:
        want = [0.6 * w + 0.4 * t for w, t in zip(want, theta, strict=True)]
    x, y = ds.tensors
    with avg.applied() as model, torch.no_grad():
        for p, w in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-6)
        averaged_loss = F.cross_entropy(model(x), y).item()
    for p, t in zip(dp.model.parameters(), trained, strict=True):
        assert torch.equal(p, t)
    with torch.no_grad():
        assert averaged_loss != F.cross_entropy(dp.model(x), y).item()
    _train(dp, avg, 1)  # training goes on after evaluating (hooks and step checks intact)
    assert dp.steps == avg.num_updates == 7


def test_average_resumes_bitwise_through_a_checkpoint_extra(tmp_path):
    straight, _ = _setup()
    straight_avg = swiftdp.ParameterAverage(straight.model, kind="polyak", start_step=2)
    _train(straight, straight_avg, 8)

    first, _ = _setup()
    first_avg = swiftdp.ParameterAverage(first.model, kind="polyak", start_step=2)
    _train(first, first_avg, 3)  # mid-epoch (4 steps per epoch)
    path = tmp_path / "ck.pt"
    first.save_checkpoint(path, extra={"average": first_avg.state_dict()})

    resumed, _ = _setup(seed=99)  # another initialisation: everything comes from the file
    resumed_avg = swiftdp.ParameterAverage(resumed.model, kind="polyak", start_step=2)
    resumed_avg.load_state_dict(resumed.load_checkpoint(path)["average"])
    assert resumed_avg.num_updates == 3
    _train(resumed, resumed_avg, 5)

    got, want = resumed_avg.averaged_state_dict(), straight_avg.averaged_state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
