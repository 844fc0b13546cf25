"""Secure noise: OS CSPRNG draws, a float64 sum of Gaussians per coordinate, never replayed.

``secure=True`` must give N(0, std²) (normality and moments), owe nothing to
torch's generator or to any seed (two runs with the same seed differ, and a
generator reseeded to the same torch state draws different noise), and keep
working on every path that adds noise (the optimizer's step).
"""

from __future__ import annotations

import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.optim.noise import (
    SECURE_SUMMANDS,
    SecureGenerator,
    add_gaussian_noise,
    make_noise_generator,
    secure_standard_normal,
)


def test_secure_samples_are_standard_normal():
    z = secure_standard_normal(200_000).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(stats.kurtosis(z)) < 0.05  # Gaussian tails, not a uniform sum's
    assert SECURE_SUMMANDS >= 2


def test_each_coordinate_is_a_sum_of_several_samples_so_the_low_bits_are_filled():
    # A single float64 Box–Muller sample and the scaled sum differ in distribution of their
    # last bits: the sum's mantissas use all 52 bits (no visible lattice from one log/cos).
    z = secure_standard_normal(10_000).numpy()
    mantissa_low = (z.view("uint64") & 0xFF)
    assert len(set(mantissa_low.tolist())) > 200


def test_secure_noise_ignores_torch_seeds_and_never_repeats():
    g1, _ = make_noise_generator(0, secure=True)
    g2, _ = make_noise_generator(0, secure=True)
    assert isinstance(g1, SecureGenerator)
    g1.manual_seed(123)
    g2.manual_seed(123)  # the same torch state: irrelevant to secure noise
    a, b = torch.zeros(1000), torch.zeros(1000)

    class Box:
        def __init__(self, t: torch.Tensor) -> None:
            self.grad, self.shape, self.dtype = t, t.shape, t.dtype

    add_gaussian_noise([Box(a)], 1.0, g1)
    add_gaussian_noise([Box(b)], 1.0, g2)
    assert not torch.equal(a, b)
    assert 0.9 < float(a.std()) < 1.1


def test_two_secure_runs_with_the_same_seed_release_different_models():
    def run() -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  DataLoader(data, batch_size=8), max_grad_norm=1.0,
                                  noise_multiplier=1.0, steps=2, seed=7, secure=True)
        x, y = next(iter(dp.data_loader))
        torch.nn.functional.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
        return model.weight.detach().clone()

    assert not torch.equal(run(), run())
