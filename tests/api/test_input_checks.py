"""Every input check of make_private names the argument, the value, and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

import swiftdp
from swiftdp.errors import InvalidArgumentError, UnsupportedModuleError


def _args(**over):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    ds = TensorDataset(torch.randn(50, 4), torch.randint(0, 2, (50,)))
    kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              train_loader=DataLoader(ds, batch_size=5), noise_multiplier=1.0,
              max_grad_norm=1.0, delta=1e-3)
    kw.update(over)
    return kw


def _call(**over):
    kw = _args(**over)
    return swiftdp.make_private(kw.pop("model"), kw.pop("optimizer"), kw.pop("train_loader"), **kw)


@pytest.mark.parametrize(
    ("over", "pattern"),
    [
        ({"noise_multiplier": -1.0}, r"noise_multiplier >= 0, got -1.0"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm > 0, got 0.0"),
        ({"max_grad_norm": -2}, r"max_grad_norm > 0, got -2"),
        ({"delta": 0.0}, r"delta in \(0, 1\), got 0.0"),
        ({"delta": 1.5}, r"delta in \(0, 1\), got 1.5"),
        ({"clipping": "foo"}, r"clipping to be one of 'flat', 'automatic', got 'foo'"),
        ({"mode": "fast"}, r"mode to be one of 'bk', 'ghost', 'per_sample', 'nanobatch', got 'fast'"),
        ({"noise_multiplier": None}, r"target_epsilon"),
        ({"noise_multiplier": None, "target_epsilon": 1.0}, r"epochs= or steps="),
        ({"target_epsilon": -1.0}, r"target_epsilon > 0, got -1.0"),
        ({"max_physical_batch_size": 0}, r"max_physical_batch_size >= 1"),
    ],
)
def test_bad_argument_message_names_argument_and_value(over, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        _call(**over)


def test_unreachable_target_epsilon_is_refused():
    with pytest.raises(InvalidArgumentError, match="target"):
        _call(noise_multiplier=None, target_epsilon=1e-6, epochs=1000)


def test_sample_rate_above_one_is_refused():
    ds = TensorDataset(torch.randn(4, 4), torch.randint(0, 2, (4,)))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        _call(train_loader=DataLoader(ds, batch_size=5))


def test_delta_not_below_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/N"):
        _call(delta=0.05)


def test_custom_sampler_warns_that_accounting_assumes_poisson():
    ds = TensorDataset(torch.randn(50, 4), torch.randint(0, 2, (50,)))
    sampler = WeightedRandomSampler(torch.ones(50), 50)
    with pytest.warns(UserWarning, match="Poisson"):
        _call(train_loader=DataLoader(ds, batch_size=5, sampler=sampler))


def test_dataset_without_len_is_refused():
    class NoLen(Dataset):
        def __getitem__(self, i):
            return torch.zeros(4), 0

    with pytest.raises(InvalidArgumentError, match="__len__"):
        _call(train_loader=DataLoader(NoLen(), batch_size=5))


def test_model_in_eval_mode_is_refused():
    kw = _args()
    kw["model"].eval()
    with pytest.raises(InvalidArgumentError, match="eval mode"):
        swiftdp.make_private(kw.pop("model"), kw.pop("optimizer"), kw.pop("train_loader"), **kw)


def test_batchnorm_is_refused_with_module_path_and_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModuleError, match=r"`1` \(BatchNorm2d\).*swiftdp.fix"):
        _call(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    fixed = swiftdp.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is not modified


def test_infinite_clipping_with_zero_noise_is_allowed():
    dp = _call(max_grad_norm=math.inf, noise_multiplier=0.0)
    assert dp.privacy.noise_std() == 0.0
