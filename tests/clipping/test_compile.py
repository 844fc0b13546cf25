"""``torch.compile``: a compiled model clips exactly as eager, or is refused.

Three ways to compile, every mode: the model given as ``torch.compile(model)``,
compiled in place (``model.compile()``) before or after swiftdp is attached,
and compiled submodules. Each either gives the eager engine's clipped sum
(bit for bit in the bk modes, where compiled code runs eagerly; within 1e-10
of the one-example-at-a-time float64 reference in ``"nanobatch"``, where
compiled submodules run compiled) or raises ``UnsupportedModuleError`` at the
first call, before any gradient is written. Dynamo runs with
``backend="aot_eager"`` (no C++ compiler needed); one test uses inductor.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any, cast

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.errors import InvalidArgumentError, UnsupportedModuleError

MODES = ("bk", "ghost", "per_sample", "nanobatch")
TRACED = ("bk", "ghost", "per_sample")
C = 0.5
TOL = 1e-10
BACKEND = "aot_eager"

pytestmark = pytest.mark.filterwarnings("ignore:mode=.* runs the")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    assert torch._dynamo.eval_frame._stance.stance == "default"  # never left forced


class _Ckpt(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def _mlp(checkpointed: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    last: nn.Module = nn.Linear(7, 3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), _Ckpt(last) if checkpointed else last).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64) * 3,
             torch.randn(n, 3, generator=g, dtype=torch.float64)) for n in (6, 4)]


def _compile(m: nn.Module, **kw: Any) -> nn.Module:
    """``torch.compile(m)``, typed as the module it wraps."""
    return cast(nn.Module, torch.compile(m, **{"backend": BACKEND, **kw}))


def _loss(out, y):
    return ((out - y) ** 2).sum(1).mean()


def _train(model: nn.Module, call: Any, mode: Any, params: nn.Module | None = None,
           **kw: Any) -> list[list[torch.Tensor]]:
    """Clipped sums of two backward passes (batch sizes 6 and 4) through ``call``."""
    params = params or model
    clipper = swiftdp.GradClipper(model, C, mode=mode, **kw)
    sums = []
    try:
        for x, y in _batches():
            for p in params.parameters():
                p.grad = None
            _loss(call(x), y).backward()
            sums.append([cast(torch.Tensor, p.grad).clone() for p in params.parameters()])
    finally:
        clipper.remove()
    return sums


def _reference():
    model = _mlp()
    return [reference_clipped_sum(model, lambda o, t: ((o - t) ** 2).sum(), x, y, C)[0]
            for x, y in _batches()]


def _eager(mode: str):
    model = _mlp()
    return _train(model, model, mode)


def _assert_exact(got, mode: str, bitwise: bool) -> None:
    for step, (g, ref) in enumerate(zip(got, _reference(), strict=True)):
        err = max_rel_error(g, ref)
        assert err < TOL, f"mode={mode} step {step}: rel. error {err:.2e} against the reference"
    if bitwise:
        for g, e in zip(got, _eager(mode), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(g, e, strict=True)), mode


@pytest.mark.parametrize("mode", MODES)
def test_compiled_wrapper_gives_the_eager_clipped_sum_bit_for_bit(mode):
    model = _mlp()
    compiled = _compile(model, fullgraph=True)
    with pytest.warns(UserWarning, match="eagerly"):
        got = _train(compiled, compiled, mode, params=model)
    assert counters["stats"]["unique_graphs"] == 0
    _assert_exact(got, mode, bitwise=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["torch.compile(block)", "block.compile()"])
def test_compiled_submodules_clip_exactly_in_every_mode(mode, how):
    model = _mlp()
    if how == "torch.compile(block)":
        model[2] = _compile(model[2])
    else:
        model[2].compile(backend=BACKEND)
    got = _train(model, model, mode)
    # The bk modes run the block eagerly (bit for bit); nanobatch runs it compiled.
    graphs = counters["stats"]["unique_graphs"]
    assert (graphs == 0) if mode in TRACED else (graphs > 0), graphs
    _assert_exact(got, mode, bitwise=mode in TRACED)


def test_compiled_submodules_warn_only_in_the_modes_that_run_them_eagerly():
    model = _mlp()
    model[2] = _compile(model[2])
    with pytest.warns(UserWarning, match=r"mode='bk' runs the compiled parts .*`2`"):
        swiftdp.GradClipper(model, C, mode="bk").remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swiftdp.GradClipper(model, C, mode="nanobatch").remove()


@pytest.mark.parametrize("mode", MODES)
def test_model_compiled_in_place_is_refused_before_any_hook(mode):
    model = _mlp()
    model.compile(backend=BACKEND)
    with pytest.raises(UnsupportedModuleError, match=r"model.compile\(\) was called on it.*nanobatch"):
        swiftdp.GradClipper(model, C, mode=mode)
    assert not model._forward_pre_hooks and not model[0]._forward_pre_hooks


@pytest.mark.parametrize("mode", ["bk", "nanobatch"])
@pytest.mark.parametrize("how", ["model.compile()", "torch.compile(model)", "compiled step"])
def test_compiling_after_attaching_is_refused_at_the_first_forward(mode, how):
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C, mode=mode)
    x, y = _batches()[0]
    if how == "model.compile()":
        model.compile(backend=BACKEND)
        step = lambda: _loss(model(x), y).backward()  # noqa: E731
    elif how == "torch.compile(model)":
        compiled = _compile(model)
        step = lambda: _loss(compiled(x), y).backward()  # noqa: E731
    else:
        step = torch.compile(lambda: _loss(model(x), y).backward(), backend=BACKEND)
    with pytest.raises(UnsupportedModuleError, match=rf"`<model>` cannot run compiled under mode='{mode}'"):
        step()
    assert all(p.grad is None for p in model.parameters())
    clipper.remove()


def test_fullgraph_compile_after_attaching_fails_naming_swiftdp():
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    compiled = _compile(model, fullgraph=True)
    with pytest.raises(Exception, match="swiftdp's hooks never run inside a compiled graph"):
        compiled(_batches()[0][0])
    clipper.remove()


@pytest.mark.parametrize("mode", ["bk", "nanobatch"])
def test_checkpointed_compiled_block_is_exact_or_refused(mode):
    wrapped = _mlp(checkpointed=True)
    block = cast(_Ckpt, wrapped[2])
    block.inner = _compile(block.inner)
    _assert_exact(_train(wrapped, wrapped, mode), mode, bitwise=False)
    torch._dynamo.reset()
    in_place = _mlp(checkpointed=True)
    cast(_Ckpt, in_place[2]).inner.compile(backend=BACKEND)
    if mode == "nanobatch":  # recomputed inside the engine's per-example passes
        _assert_exact(_train(in_place, in_place, mode), mode, bitwise=False)
    else:  # recomputed in the backward, where no stance can reach it
        with pytest.raises(UnsupportedModuleError, match=r"`2.inner` cannot run compiled"):
            _train(in_place, in_place, mode)


def test_group_prefixes_name_the_uncompiled_model():
    model = _mlp()
    compiled = _compile(model)
    clipper = swiftdp.GradClipper(compiled, {"0": 0.5, "2": 0.3})
    assert clipper.model is model and "0.weight" in dict(model.named_parameters())
    clipper.remove()
    with pytest.raises(InvalidArgumentError):
        swiftdp.GradClipper(compiled, {"_orig_mod.0": 0.5, "_orig_mod.2": 0.3})


def test_remove_leaves_the_compiled_model_as_it_was():
    model = _mlp()
    compiled = _compile(model)
    swiftdp.GradClipper(compiled, C).remove()
    for m in [compiled, *model.modules()]:
        assert not m._forward_pre_hooks and not m._forward_hooks


@pytest.mark.parametrize("mode", ["bk", "nanobatch"])
def test_make_private_trains_a_compiled_model_like_the_eager_one(mode):
    def run(compile_it: bool):
        model = _mlp()
        target: nn.Module = model
        if compile_it and mode == "bk":
            target = _compile(model)
        elif compile_it:
            model[2] = _compile(model[2])
        g = torch.Generator().manual_seed(2)
        data = TensorDataset(torch.randn(32, 5, generator=g, dtype=torch.float64),
                             torch.randn(32, 3, generator=g, dtype=torch.float64))
        dp = swiftdp.make_private(target, torch.optim.SGD(model.parameters(), lr=0.1),
                                  DataLoader(data, batch_size=8), max_grad_norm=C,
                                  noise_multiplier=1.0, mode=mode, seed=3)
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            _loss(dp.model(x), y).backward()
            dp.optimizer.step()
        dp.detach()
        return [p.detach().clone() for p in model.parameters()]

    eager = run(False)
    for a, b in zip(run(True), eager, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=0.0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="inductor needs a C++ compiler")
def test_inductor_compiled_submodule_clips_exactly_in_nanobatch():
    model = _mlp()
    model[2] = _compile(model[2], backend="inductor")
    _assert_exact(_train(model, model, "nanobatch"), "nanobatch", bitwise=False)
    assert counters["stats"]["unique_graphs"] > 0
