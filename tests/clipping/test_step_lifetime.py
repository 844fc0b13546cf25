"""A step and its forward's activations are freed once it is over (no cycle through autograd)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import swiftdp


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_a_finished_step_is_freed_without_the_garbage_collector(mode):
    model = _model()
    clipper = swiftdp.GradClipper(model, 1.0, mode=mode)
    gc.disable()
    try:
        refs = []
        for _ in range(3):
            out = model(torch.randn(6, 4))
            refs.append(weakref.ref(clipper._step))
            out.pow(2).mean().backward()
            del out
        model(torch.randn(6, 4))  # a new step: the last one is over too
        alive = [r() is not None for r in refs]
    finally:
        gc.enable()
        clipper.remove()
    assert not any(alive), f"steps kept alive: {alive}"


def test_a_step_whose_backward_raised_is_freed_at_the_next_forward():
    model = _model()
    clipper = swiftdp.GradClipper(model, 1.0)
    gc.disable()
    try:
        out = model(torch.randn(6, 4))
        ref = weakref.ref(clipper._step)
        ref().started = True  # as a backward that raised half-way leaves it
        del out
        model(torch.randn(6, 4))
        alive = ref() is not None
    finally:
        gc.enable()
        clipper.remove()
    assert not alive
