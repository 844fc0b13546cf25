"""Adversarial review, round 2: lookups without the batch, merged batches, addmm.

Findings (``xfail(strict=True)`` assert the correct behaviour and record what
was measured; B = T = 4, C = 0.05, float64):

* a batch merged with the examples *innermost* (``x.transpose(0, 1).reshape(-1,
  d)``, a sequence-first flatten) loses its mark, and parameter uses on it run
  as batch-free ("shared") with no error: a parameter meeting it gets a zero
  gradient (relative error 1.0), and a statistic over it meeting the batch
  leaks through ``GradClipper`` (1.62 C; make_private's probe refuses it);
* ``w @ xm.t()`` / ``torch.addmm(b, w, xm.t())`` with the merged batch as the
  *second* matrix: every gradient is zero, no error;
* ghost mode: two lookups of one table inside one shared value crash with a
  bare ``NotImplementedError`` (``contributions.instantiate``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import SwiftDPError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F64 = torch.float64
C = 0.05
B = T = D = 4
TOL = 1e-9
NOT_FIXED = (AssertionError, pytest.fail.Exception)


def _loss(out: Tensor, _y: object = None) -> Tensor:
    return out.pow(2).sum()


def _grads(model: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in model.parameters()]


def _run(base: nn.Module, mode: str = "bk"):
    def run(x: Tensor) -> list[Tensor]:
        model = copy.deepcopy(base)
        clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum")
        try:
            _loss(model(x)).backward()
        finally:
            clipper.remove()
        return _grads(model)
    return run


def _x() -> Tensor:
    return torch.randn(B, T, D, dtype=F64, generator=torch.Generator().manual_seed(1))


class Crafted(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.E = nn.Embedding(8, D)
        self.P = nn.Embedding(8, D, padding_idx=0)
        self.q = nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D))
        self.b = nn.Parameter(torch.randn(D))
        self.row = nn.Parameter(torch.randn(1, D))

    def forward(self, x: Tensor) -> Tensor:
        h, n = self.how, x.shape[1]
        ar = torch.arange(n)
        # ---- lookups without the batch
        if h == "two_lookups_overlap":
            return self.q(x) * (self.E(ar) + self.E(torch.zeros_like(ar)))
        if h == "two_lookups_same":
            return self.q(x) + self.E(ar[None]) * self.E(ar[None])
        if h == "getitem_twice":
            return self.q(x) * (self.E.weight[ar] + self.E.weight[ar.flip(0)])
        if h == "lookup_plus_batched_lookup":
            ids = (x[..., 0].abs() * 3).long().clamp(0, 7)
            return self.q(x) * self.E(ar[None]) + self.E(ids)
        if h == "lookup_and_dense":
            return (self.q(x) + self.E(ar[None])) @ self.E.weight.t()
        if h == "lookup_and_dense_in_one_value":
            return self.q(x) * (self.E(ar[None]) + 2 * self.E.weight[:n])
        if h == "lookup_inplace_mul":
            p = self.E(ar[None])
            p.mul_(2)
            return self.q(x) * p
        if h == "lookup_inplace_setitem":
            p = self.E(ar[None])
            p[:, 0] = 0.0
            return self.q(x) * p
        if h == "padding_idx":
            return self.q(x) * self.P(ar[None])
        if h == "getitem_lookup":
            return self.q(x) * self.E.weight[ar]
        # ---- copies to the batch whose factor coincides with B (T == B)
        if h == "expand_T_eq_B":
            return self.q(x) * torch.tanh(self.row).expand(n, D)
        if h == "repeat_T_eq_B":
            return self.q(x) * torch.tanh(self.row).repeat(n, 1)
        # ---- merged batches
        xm = x.reshape(-1, D)  # examples outermost
        xi = x.transpose(0, 1).reshape(-1, D)  # examples innermost: the batch is lost
        if h == "merged_outer_meet":
            return (self.q(x).reshape(-1, D) * torch.tanh(self.row)).reshape(x.shape)
        if h == "merged_inner_meet":
            zi = self.q(x).transpose(0, 1).reshape(-1, D)
            return (zi * torch.tanh(self.row)).reshape(n, -1, D).transpose(0, 1)
        if h == "merged_inner_bias":
            zi = self.q(x).transpose(0, 1).reshape(-1, D)
            return (zi + self.b).reshape(n, -1, D).transpose(0, 1)
        if h == "merged_inner_statistic":
            return self.q(x) * torch.tanh(xi * self.b).mean(0)
        # ---- addmm / mm (HF Conv1D and variants)
        if h == "addmm_plain":
            return torch.addmm(self.b, xm, self.w).reshape(x.shape)
        if h == "addmm_beta_alpha":
            return torch.addmm(self.b, xm, self.w, beta=0.5, alpha=2.0).reshape(x.shape)
        if h == "addmm_bias2d":
            return torch.addmm(self.b[None], xm, self.w).reshape(x.shape)
        if h == "addmm_2d_batch":
            return torch.addmm(self.b, x[:, 0], self.w)
        if h == "addmm_weight_first":
            return torch.addmm(self.b[:, None], self.w, xm.t()).t().reshape(x.shape)
        if h == "mm_weight_first":
            return (self.w @ xm.t()).t().reshape(x.shape)
        if h == "matmul_weight_first_3d":
            return (self.w @ x.transpose(1, 2)).transpose(1, 2)
        raise AssertionError(h)


def _model(how: str) -> nn.Module:
    torch.manual_seed(0)
    return Crafted(how).double()


def _refused_or_exact_and_within_c(how: str, mode: str = "bk") -> None:
    model, x = _model(how), _x()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, x, None, C)
    run = _run(model, mode)
    try:
        got = run(x)
    except SwiftDPError:
        return
    assert neighbour_sensitivity(run, x, B) <= C * (1 + 1e-9)
    assert max_rel_error(got, want) < TOL


# ==================================================================== holds
@pytest.mark.parametrize("how", [
    "two_lookups_overlap", "two_lookups_same", "getitem_twice", "lookup_plus_batched_lookup",
    "lookup_and_dense", "lookup_and_dense_in_one_value", "lookup_inplace_mul",
    "lookup_inplace_setitem", "padding_idx", "getitem_lookup", "expand_T_eq_B",
    "repeat_T_eq_B", "merged_outer_meet", "addmm_plain", "addmm_beta_alpha", "addmm_bias2d",
    "addmm_2d_batch", "matmul_weight_first_3d"])
def test_lookup_credit_tiling_and_addmm_are_exact_in_bk(how):
    _refused_or_exact_and_within_c(how, "bk")


@pytest.mark.parametrize("how", [
    "lookup_plus_batched_lookup", "lookup_and_dense", "lookup_and_dense_in_one_value",
    "lookup_inplace_setitem", "padding_idx", "getitem_lookup", "addmm_beta_alpha"])
def test_lookup_credit_and_addmm_are_exact_in_ghost(how):
    _refused_or_exact_and_within_c(how, "ghost")


# ==================================================================== findings
# fixed (was, measured before the fix: see the module docstring)
@pytest.mark.parametrize("how", ["two_lookups_overlap", "two_lookups_same", "getitem_twice"])
def test_two_lookups_of_one_table_in_ghost_mode(how):
    _refused_or_exact_and_within_c(how, "ghost")


# fixed (was, measured before the fix: see the module docstring)
@pytest.mark.parametrize("how", ["merged_inner_meet", "merged_inner_bias"])
def test_parameter_meeting_an_innermost_merged_batch(how):
    _refused_or_exact_and_within_c(how)


@pytest.mark.xfail(strict=True, raises=NOT_FIXED, reason=(
    "measured: a statistic of an innermost-merged batch (tanh(xi * b).mean(0)) runs as a "
    "batch-free shared value and meets the batch: GradClipper sensitivity 1.62 C, relative "
    "error 1.23, no error (make_private's independence probe refuses this model)"))
def test_statistic_of_an_innermost_merged_batch_through_gradclipper():
    _refused_or_exact_and_within_c("merged_inner_statistic")


# fixed (was, measured before the fix: see the module docstring)
@pytest.mark.parametrize("how", ["mm_weight_first", "addmm_weight_first"])
def test_weight_first_against_a_transposed_merged_batch(how):
    _refused_or_exact_and_within_c(how)
