"""Guards of pipeline stages and late process groups that need no second process.

* The pipeline exchange is for pipeline stages only.
* Checkpoints of pipeline stages are refused (per-stage files could let two
  stages resume one noise stream).
* A process group initialised after ``make_private`` is refused at the step.
* Group thresholds must be finite.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
import swiftdp.distributed
from swiftdp.api import checkpoint as ckpt
from swiftdp.errors import (
    CheckpointError,
    InvalidArgumentError,
    StepStructureError,
)


def test_the_pipeline_exchange_is_refused_outside_a_pipeline():
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(data, batch_size=5), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=2, seed=0)
    for call in (dp.stage_backward, dp.receive_activations,
                 lambda: dp.send_activations(torch.zeros(2, 2))):
        with pytest.raises(InvalidArgumentError, match="pipeline stages"):
            call()


def test_pipeline_stage_checkpoints_are_refused(tmp_path):
    run = SimpleNamespace(privacy=SimpleNamespace(pipeline_stage=0))
    with pytest.raises(CheckpointError, match="pipeline stages"):
        ckpt.save(run, tmp_path / "c.ckpt", {})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="pipeline stages"):
        ckpt.load(run, tmp_path / "c.ckpt")  # type: ignore[arg-type]


def test_a_process_group_initialised_after_make_private_is_refused(monkeypatch):
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(data, batch_size=5), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=2, seed=0)
    monkeypatch.setattr(swiftdp.distributed, "active", lambda: True)
    x, y = next(iter(dp.data_loader))
    if len(x):
        F.cross_entropy(dp.model(x), y).backward()
    with pytest.raises(StepStructureError, match="initialised after make_private"):
        dp.optimizer.step()
    assert dp.steps == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_group_thresholds_must_be_finite(bad):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(InvalidArgumentError, match="finite"):
        swiftdp.GradClipper(model, {"0": 1.0, "1": bad})
