"""Guards of pipeline stages and late process groups that need no second process.

* A stage before the last has no loss the engine can check, so only the
  received gradient may reach its output (:class:`swiftdp.pipeline.StageOutput`):
  a regulariser of its output that couples examples, or a second backward,
  is refused; the received gradient alone gives the plain-autograd gradient.
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
    ExampleMixingError,
    InvalidArgumentError,
    StepStructureError,
)
from swiftdp.pipeline import StageOutput


def _stage() -> tuple[nn.Module, swiftdp.GradClipper, StageOutput]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
    clipper = swiftdp.GradClipper(model, 1e3, loss_reduction="sum", check_loss=False)
    return model, clipper, StageOutput(model)


def test_the_received_gradient_alone_gives_the_plain_gradient():
    model, clipper, out = _stage()
    x = torch.randn(6, 4, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    out.backward(model(x), g)
    got = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    clipper.remove()
    out.handle.remove()
    for p in model.parameters():
        p.grad = None
    model(x).backward(g)  # C far above every norm: nothing clipped
    for a, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-12)  # type: ignore[arg-type]


def test_a_regulariser_of_the_stage_output_is_refused():
    model, _, out = _stage()
    h = model(torch.randn(6, 4, dtype=torch.float64))
    g = torch.randn(6, 5, dtype=torch.float64)
    reg = 0.1 * h.mean(0).pow(2).sum()  # couples the examples (a centring term)
    out.expected = g
    with pytest.raises(ExampleMixingError, match="not the one received"):
        torch.autograd.backward([h, reg], [g, torch.ones(())])


def test_a_backward_other_than_stage_backward_is_refused():
    model, _, _ = _stage()
    h = model(torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(ExampleMixingError, match="stage_backward"):
        h.backward(torch.randn(6, 5, dtype=torch.float64))


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
