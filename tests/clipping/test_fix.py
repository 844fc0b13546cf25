"""``swiftdp.fix``: BatchNorm becomes GroupNorm, and a fused norm-and-activation keeps its activation.

timm's ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass that applies ``drop``
then ``act`` after normalising) cannot be installed here (timm needs
torchvision, whose CPU build the package index lacks), so a replica with the
same structure and forward stands in for it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from swiftdp.clipping.fix import NormAct
from swiftdp.errors import UnsupportedModuleError


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: ``bn -> drop -> act``, the modules registered in that order."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU,
                 drop: bool = False, act_first: bool = False) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(0.1) if drop else nn.Identity()
        self.act = act_layer()
        self.act_first = act_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_first:  # not a norm followed by its modules: must be refused
            x = self.act(x)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        x = self.drop(x)
        return x if self.act_first else self.act(x)


def _net(**kw: object) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, **kw), nn.Conv2d(8, 4, 3),
                         nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_a_fused_norm_keeps_its_activation_and_dropout_and_is_reported(caplog):
    torch.manual_seed(0)
    model = _net(act_layer=nn.SiLU, drop=True)
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    report: list[str] = []
    with caplog.at_level(logging.INFO, logger="swiftdp"):
        fixed = swiftdp.fix(model, report=report)
    assert isinstance(fixed[1], NormAct)
    assert [type(m) for m in fixed[1]] == [nn.GroupNorm, nn.Dropout, nn.SiLU]
    assert isinstance(fixed[3], nn.GroupNorm)
    assert sum(isinstance(m, nn.SiLU) for m in fixed.modules()) == 1  # the activation kept
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert len(report) == 2 and report[0].startswith("1: BatchNormAct2d(8) -> GroupNorm(")
    assert "act=SiLU" in report[0] and "drop=Dropout" in report[0]
    assert len([r for r in caplog.records if "swiftdp.fix" in r.getMessage()]) == 2
    # the replacement computes GroupNorm, then the same modules
    fixed.eval()
    x = torch.randn(2, 3, 8, 8)
    h = fixed[0](x)
    assert torch.allclose(fixed[1](h), F.silu(fixed[1][0](h)))


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_the_fixed_model_trains_per_example_exactly(mode):
    from support.harness import check_against_oracle

    torch.manual_seed(0)
    # (no conv bias: a per-channel norm right after it cancels it, its true gradient is 0)
    model = swiftdp.fix(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormAct2d(8),
                                      nn.Flatten(), nn.Linear(8 * 6 * 6, 2))).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    check_against_oracle(model, x, torch.randn(4, 2, dtype=torch.float64), mode=mode)


def test_a_fused_norm_that_does_more_than_follow_with_its_modules_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_first=True))
    with pytest.raises(UnsupportedModuleError, match=r"`1`.*architecture"):
        swiftdp.fix(model)
