"""No gradient but the engine's reaches a trainable parameter: exact or refused.

Each case is a way ordinary user code could let autograd deliver a gradient
to a parameter outside the clipping engine. The engine either makes it
exact (checked against the one-example-at-a-time float64 reference) or
refuses it with a named error — the gradient discarded, never applied.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from support.oracle import reference_clipped_sum
from swiftdp.errors import GradientEscapeError, UnsupportedModuleError

C = 0.5
B = 5


def _x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(B, 3, dtype=torch.float64)


def _loss(out: torch.Tensor, _t: object = None) -> torch.Tensor:
    return out.pow(2).sum()


def _assert_exact(model: nn.Module, make_ref: nn.Module, call, x: torch.Tensor, mode: str) -> None:
    make_ref.load_state_dict(model.state_dict())
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
    _loss(call(model, x)).backward()
    clipper.remove()
    sums, _ = reference_clipped_sum(make_ref, _loss, x, torch.zeros(B), C, call=call)
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, s in zip(got, sums, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-10)


class _WithRootParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.full((2,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def _refused(model: nn.Module, run, match: str, error: type[Exception] = GradientEscapeError) -> None:
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    with pytest.raises(error, match=match):
        run(model)
    # the escaped gradient was discarded, not left for an optimizer to apply
    assert all(p.grad is None for n, p in model.named_parameters() if n in match)
    clipper.remove()


def test_model_forward_called_directly_is_refused_naming_the_parameter():
    model = _WithRootParam().double()
    _refused(model, lambda m: _loss(m.forward(_x())).backward(), "scale")


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
def test_submodule_called_directly_is_exact(mode):
    model = _WithRootParam().double()
    ref = _WithRootParam().double()
    _assert_exact(model, ref, lambda m, x: m.lin(x), _x(), mode)


def _sequential() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_sequential_forward_called_directly_is_exact_with_the_low_level_clipper(mode):
    _assert_exact(_sequential(), _sequential(), lambda m, x: m.forward(x), _x(), mode)


@pytest.mark.parametrize("mode", ["ghost", "nanobatch"])
def test_two_forwards_before_a_backward_are_refused_in_modes_clipping_at_the_output(mode):
    model = _sequential()
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
    with pytest.raises(UnsupportedModuleError, match="once per backward"):
        _loss(model.forward(_x())).backward()
    with pytest.raises(UnsupportedModuleError, match="once per backward"):
        _loss(model(_x()) + model(_x())).backward()
    clipper.remove()


def test_parameter_used_in_the_loss_is_refused():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    model = M().double()
    _refused(model, lambda m: (_loss(m(_x())) / m.temperature).backward(), "temperature")


def test_custom_autograd_function_taking_a_parameter_is_refused():
    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):  # type: ignore[override]
            ctx.save_for_backward(x, w)
            return x @ w.t()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            x, w = ctx.saved_tensors
            return g @ w, g.t() @ x

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return MatMul.apply(x, self.w)

    _refused(M().double(), lambda m: _loss(m(_x())).backward(), "w")


def test_forward_hook_added_after_the_engine_is_refused():
    model = _WithRootParam().double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    model.register_forward_hook(lambda mod, i, o: o * mod.scale)
    with pytest.raises(GradientEscapeError, match="scale"):
        _loss(model(_x())).backward()
    assert model.scale.grad is None
    clipper.remove()


def test_parameter_added_after_the_engine_is_clipped_exactly():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.extra: nn.Module | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h if self.extra is None else self.extra(torch.tanh(h))

    torch.manual_seed(2)
    model, ref = M().double(), M().double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    model.extra = nn.Linear(2, 2).double()  # added after the engine was attached
    ref.extra = nn.Linear(2, 2).double()
    ref.load_state_dict(model.state_dict())
    x = _x()
    _loss(model(x)).backward()
    clipper.remove()
    sums, _ = reference_clipped_sum(ref, _loss, x, torch.zeros(B), C)
    for p, s in zip(model.parameters(), sums, strict=True):
        torch.testing.assert_close(p.grad, s, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_parameter_nested_in_a_keyword_list_is_found_and_clipped_exactly(mode):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.w = nn.Parameter(torch.randn(3, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return torch.cat(tensors=[h, torch.einsum("bi,ij->bj", h, self.w)], dim=1)

    torch.manual_seed(3)
    model, ref = M().double(), M().double()
    _assert_exact(model, ref, lambda m, x: m(x), _x(), mode)


def test_a_module_run_inside_a_backward_outside_checkpointing_is_refused():
    # Activation checkpointing is exact (tests/clipping/test_checkpointing.py);
    # any other forward inside a backward pass would train outside its step.
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h.register_hook(self._rerun)
            return self.b(h)

        def _rerun(self, g: torch.Tensor) -> None:
            with torch.enable_grad():
                self.b(g).sum().backward()

    model = M().double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    with pytest.raises(UnsupportedModuleError, match="inside a backward pass"):
        _loss(model(_x())).backward()
    clipper.remove()


@pytest.mark.parametrize(
    "parametrize",
    [
        lambda m: nn.utils.parametrizations.weight_norm(m),
        lambda m: nn.utils.parametrizations.orthogonal(m),
        lambda m: nn.utils.parametrize.register_parametrization(m, "weight", _Symmetric()),
    ],
    ids=["weight_norm", "orthogonal", "custom"],
)
@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
def test_parametrized_weights_are_clipped_exactly_through_the_underlying_parameters(parametrize, mode):
    def make() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(parametrize(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 2)).double()

    model = make()
    names = [n for n, _ in model.named_parameters()]
    assert any("original" in n for n in names)
    _assert_exact(model, make(), lambda m, x: m(x), _x(), mode)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class _Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).transpose(-1, -2)


def test_unsupported_generic_recompute_is_refused_naming_the_module():
    class RowParam(nn.Module):  # one parameter row per batch position: not per-example
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(B, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(tensors=[x, self.p], dim=1)

    model = nn.Sequential(RowParam(), nn.Linear(5, 2)).double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    with pytest.raises(UnsupportedModuleError, match="`0`"):
        F.mse_loss(model(_x()), torch.zeros(B, 2, dtype=torch.float64),
                   reduction="sum").backward()
    clipper.remove()




def test_a_batch_moved_to_another_dimension_is_refused_not_misattributed():
    # (B, T, d) transposed to (T, B, d) with T == B: dimension 0 has the batch's
    # size but indexes time steps; a size check alone would clip per time step.
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.transpose(0, 1))

    model = Transposed().double()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    with pytest.raises(UnsupportedModuleError, match="batch at dimension 1"):
        _loss(model(torch.randn(4, 4, 3, dtype=torch.float64))).backward()
    clipper.remove()
