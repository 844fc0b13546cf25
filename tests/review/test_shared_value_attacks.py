"""Adversarial review: values computed from parameters without the batch (``clipping.shared``).

A batch-free parameter use (a layer rule raising ``Unbatched``) runs on
aliases; where the *shared* value meets a batched operand it is expanded along
the batch (``VIRTUAL``), each row's gradient pulled back to the aliases as that
example's gradient; later tensors mixing such rows with data are ``TAINTED``.
Per-example crediting is only right while row ``i`` of every broadcast copy
reaches example ``i``'s loss alone. The findings below break that, or the
forward itself, with no error:

* a size-1 (or batch-sized, rows-alike) index dimension is taken for the
  batch (T = 1 sequences; a key-position table with T == B);
* ``batchdim.out_dim`` places a broadcast operand's batch by its *leading*
  sizes, so ``a[:, None] + t`` (rank-increasing broadcast) is taken as aligned;
* reductions along a TAINTED batch (``sum``/``amax``) are not "touching";
* a TAINTED value whose batch dimension became unknown (merged behind another
  dimension, unbound, repeated) may be moved freely;
* a shared value changed in place after it met the batch is pulled back
  through the later op; a merged ``(B * T, ...)`` batch meeting a shared
  value crashes.

The probe of ``make_private`` is blind to most of them: the broadcast rows are
alike, so moving them does not change the forward.

Oracles: ``support.oracle.reference_clipped_sum`` (one example at a time,
float64) and ``support.sensitivity.neighbour_sensitivity`` (must be <= C).
``xfail(strict=True)`` tests assert the correct behaviour (a ``SwiftDPError``,
or exact with sensitivity <= C) and record what was measured.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import SwiftDPError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F64 = torch.float64
C = 0.05
T = 4
B = 4
TOL = 1e-9
NOT_FIXED = (AssertionError, pytest.fail.Exception)


# ----------------------------------------------------------------- helpers
def _loss(out: Tensor, _y: object = None) -> Tensor:
    return out.pow(2).sum()


def _x(b: int = B, t: int = T, d: int = 4, seed: int = 1) -> Tensor:
    return torch.randn(b, t, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _grads(model: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in model.parameters()]


def _clipper_sum(base: nn.Module, mode: str = "bk", **kw):
    def run(x: Tensor) -> list[Tensor]:
        model = copy.deepcopy(base)
        clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction="sum", **kw)
        try:
            _loss(model(x)).backward()
        finally:
            clipper.remove()
        return _grads(model)
    return run


def _private_sum(base: nn.Module, **kw):
    """S through make_private (sigma = 0, q = 1, SGD lr = 1): its independence probe runs too."""
    def run(x: Tensor) -> list[Tensor]:
        model = copy.deepcopy(base)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        data = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=len(x))
        dp = swiftdp.make_private(model, opt, data, noise_multiplier=0.0, max_grad_norm=C,
                                  delta=1e-4, seed=0, loss_reduction="sum", **kw)
        for xb, _ in dp.data_loader:
            _loss(dp.model(xb)).backward()
            dp.optimizer.step()
        qn = dp.privacy.expected_batch_size
        return [(b - p.detach()) * qn for b, p in zip(before, model.parameters(), strict=True)]
    return run


def _refused_or_exact_and_private(base: nn.Module, x: Tensor, run=None) -> None:
    """Refused with a SwiftDPError, or exact (float64 oracle) with sensitivity <= C."""
    run = run or _private_sum(base)
    want, _ = reference_clipped_sum(copy.deepcopy(base), _loss, x, None, C)
    try:
        got = run(x)
    except SwiftDPError:
        return
    assert max_rel_error(got, want) < TOL
    assert neighbour_sensitivity(run, x, len(x)) <= C * (1 + 1e-9)


class RelBias(nn.Module):
    """tests/clipping/test_shared.py's RelBias: scores + a (T, T) relative-position bias."""

    def __init__(self, how: str = "add") -> None:
        super().__init__()
        self.rel = nn.Embedding(2 * T + 1, 2)
        self.scale = nn.Linear(2, 1, bias=False)
        self.q = nn.Linear(4, 4)
        self.pos = nn.Embedding(T, T)
        self.how = how

    def bias(self, t: int) -> Tensor:
        idx = torch.arange(t)[None, :] - torch.arange(t)[:, None] + T
        return self.scale(torch.tanh(self.rel(idx))).squeeze(-1)  # (t, t)

    def forward(self, x: Tensor) -> Tensor:
        s = self.q(x) @ x.transpose(1, 2)  # (B, t, t)
        h, n = self.how, x.shape[1]
        if h.startswith("emb_"):  # the older VIRTUAL path: a (1, T) lookup expanded to (B, T, T)
            p = self.pos(torch.arange(n)[None])
            if h == "emb_bcast_matmul":
                return (s[:, None] @ p).mean(1)
            raise AssertionError(h)
        b = self.bias(n)
        if h == "add":
            return s + b
        if h == "mean1":
            return (s + b).mean(1)
        if h == "where_cond":
            return torch.where(b > 0, s, -s)
        if h == "masked_fill":
            return b.masked_fill(s > 0, 0.0) + s
        if h == "iadd_into_batch":
            out = s.clone()
            out += b
            return out
        if h == "inplace_after_meet":
            out = s + b
            b.mul_(3.0)  # the bias is changed after the batch used it
            return out
        if h == "merged_meet":  # OPT-style flattened tokens (B * T, T) meet the bias's first row
            return (s.reshape(-1, n) * b[0]).reshape(s.shape)
        if h == "ckpt_bias_nonreentrant":
            return s + checkpoint(self.bias, n, use_reentrant=False)
        if h == "ckpt_add_reentrant":
            return checkpoint(lambda a, bb: self.q(a) @ a.transpose(1, 2) + bb, x, b,
                              use_reentrant=True)
        # --- the broadcast rows moved or mixed across examples (data-free: the probe is blind)
        z = b + torch.zeros_like(s)  # TAINTED (B, t, t): the bias's rows, no data in them
        if h == "sum0":
            return s + z.sum(0, keepdim=True)
        if h == "amax0":
            return s + z.amax(0)
        if h == "bcast_add":  # (B, 1, t, t) + (B, t, t) -> (B, B, t, t): z's batch is dim 1
            return (s[:, None] + z).mean(1)
        if h == "bcast_matmul":
            return (s[:, None] @ z).mean(1)
        if h == "tflat_roll":  # batch merged behind t: its dimension unknown, then rolled
            u = z.transpose(0, 1).reshape(-1).roll(n)
            return s + u.reshape(n, x.shape[0], n).transpose(0, 1)
        if h == "unbind_stack":
            return s + torch.stack(list(reversed(z.unbind(0))))
        if h == "split_cat":
            return s + torch.cat(list(reversed(z.split(1, 0))), 0)
        if h == "repeat_narrow":
            return s + z.repeat(2, 1, 1)[1:x.shape[0] + 1]
        raise AssertionError(h)


def _rel(how: str) -> nn.Module:
    torch.manual_seed(0)
    return RelBias(how).double()


# ==================================================================== holds
@pytest.mark.parametrize("how", ["where_cond", "masked_fill", "iadd_into_batch",
                                 "ckpt_bias_nonreentrant"])
def test_allowed_meets_and_nonreentrant_checkpoint_are_exact(how):
    model, x = _rel(how), _x()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, x, None, C)
    for mode in ("bk", "ghost"):
        assert max_rel_error(_clipper_sum(model, mode)(x), want) < TOL


def test_shared_bias_with_physical_batches_keeps_sensitivity_within_c():
    model, x = _rel("add"), _x()
    _refused_or_exact_and_private(model, x, _private_sum(model, max_physical_batch_size=3))


def test_parameter_used_on_the_batch_and_without_it_is_exact_in_every_mode():
    class Both(RelBias):
        def forward(self, x: Tensor) -> Tensor:
            s = self.q(x) @ x.transpose(1, 2)
            return s + self.bias(T) + self.scale(torch.tanh(x[..., :2])).squeeze(-1)[:, :, None]

    torch.manual_seed(0)
    model, x = Both().double(), _x()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, x, None, C)
    for mode in ("bk", "ghost", "per_sample", "nanobatch"):
        assert max_rel_error(_clipper_sum(model, mode)(x), want) < TOL


def test_sequence_first_shared_lookup_is_exact():
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rel, self.lin = nn.Embedding(T, 4), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:  # (T, B, 4); a (T,) lookup, no batch
            return self.lin(x) + self.rel(torch.arange(x.shape[0]))[:, None]

    torch.manual_seed(0)
    model = SeqFirst().double()
    x = torch.randn(T, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))

    def run(xb: Tensor) -> list[Tensor]:
        m = copy.deepcopy(model)
        clipper = swiftdp.GradClipper(m, C, loss_reduction="sum", batch_first=False)
        try:
            _loss(m(xb)).backward()
        finally:
            clipper.remove()
        return _grads(m)

    want, _ = reference_clipped_sum(copy.deepcopy(model), _loss, x, None, C, batch_dim=1)
    assert max_rel_error(run(x), want) < TOL
    assert neighbour_sensitivity(run, x, 3, batch_dim=1) <= C * (1 + 1e-9)


def _refused_without_grads(model: nn.Module, loss_of) -> None:
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum", check_loss=False)
    try:
        with pytest.raises(SwiftDPError):
            loss_of(model).backward()
    finally:
        clipper.remove()
    assert all(p.grad is None for p in model.parameters())


def test_shared_value_met_and_also_reaching_the_loss_is_refused():
    class Twice(RelBias):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            b = self.bias(T)
            return self.q(x) @ x.transpose(1, 2) + b, b

    torch.manual_seed(0)
    x = _x()
    def loss_of(m: nn.Module) -> Tensor:
        scores, bias = m(x)
        return _loss(scores) + bias.sum()

    _refused_without_grads(Twice().double(), loss_of)


def test_shared_value_cached_across_steps_is_refused_in_the_second_step():
    class Cached(RelBias):
        cache: Tensor | None = None

        def forward(self, x: Tensor) -> Tensor:
            if self.cache is None:
                self.cache = self.bias(T)  # computed in step 1, reused in step 2
            return self.q(x) @ x.transpose(1, 2) + self.cache

    torch.manual_seed(0)
    model, x = Cached().double(), _x()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        _loss(model(x)).backward()
        model.zero_grad(set_to_none=True)
        with pytest.raises(SwiftDPError, match="reached the loss"):
            _loss(model(x)).backward()
    finally:
        clipper.remove()
    assert all(p.grad is None for p in model.parameters())


def test_shared_value_passed_into_a_reentrant_checkpoint_is_refused():
    # Loud, but the message ("reached the loss without being combined with the batch") is
    # misleading: it was combined, inside the checkpoint. HF T5 with
    # gradient_checkpointing_enable(use_reentrant=True) is refused the same way.
    model, x = _rel("ckpt_add_reentrant"), _x()
    _refused_without_grads(model, lambda m: _loss(m(x)))


def test_a_batch_statistic_into_a_batch_free_layer_is_refused_or_caught_by_the_probe():
    class Stat(nn.Module):
        def __init__(self, launder: bool) -> None:
            super().__init__()
            self.lin, self.proj, self.launder = nn.Linear(4, 4), nn.Linear(4, 4), launder

        def forward(self, x: Tensor) -> Tensor:
            h = self.lin(x)
            st = (torch.tensor(x.mean((0, 1)).tolist(), dtype=x.dtype) if self.launder
                  else h.mean((0, 1)).detach())
            return h + self.proj(st)

    x = _x()
    for launder in (False, True):
        torch.manual_seed(0)
        with pytest.raises(SwiftDPError):
            _private_sum(Stat(launder).double())(x)


# ================================================================= findings
# fixed (was: measured before the fix)
@pytest.mark.parametrize("how", ["add", "mean1"])
def test_single_token_relative_bias(how):
    _refused_or_exact_and_private(_rel(how), _x(t=1))


# fixed (was: a RuntimeError in the forward; lookups without the batch stay batch-free)
def test_t5_single_token_decoder_is_exact_or_refused():
    import transformers as tf

    v, n = 30, 3
    torch.manual_seed(0)
    cfg = tf.T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=8, d_kv=4,
                      d_ff=16, vocab_size=v, decoder_start_token_id=0, pad_token_id=0,
                      dropout_rate=0.0, relative_attention_num_buckets=8)
    model = tf.T5ForConditionalGeneration(cfg).double().train()
    g = torch.Generator().manual_seed(0)
    ids, lab = torch.randint(1, v, (n, 4), generator=g), torch.randint(1, v, (n, 1), generator=g)
    x = torch.cat([ids, lab], 1)

    def call(m: nn.Module, xb: Tensor) -> Tensor:
        out = m(input_ids=xb[:, :4], decoder_input_ids=torch.zeros_like(xb[:, 4:]))
        return F.cross_entropy(out.logits.reshape(-1, v), xb[:, 4:].reshape(-1), reduction="sum")

    want, _ = reference_clipped_sum(copy.deepcopy(model), lambda o, _y: o, x, None, C, call=call)
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        try:
            call(model, x).backward()
        except SwiftDPError:
            return
    finally:
        clipper.remove()
    assert max_rel_error(_grads(model), want) < TOL


class _Table(nn.Module):
    """A key-position bias: a (T, T) lookup whose rows are alike (each query sees key j's entry)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.rel, self.how = nn.Embedding(8, 1), how

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        idx = (torch.arange(n)[None].repeat(n, 1) if self.how == "repeat"
               else torch.arange(n)[None].expand(n, n))
        return x * self.rel(idx).squeeze(-1)  # (B, T, T) * (T, T)


# fixed (was: measured before the fix)
@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_rows_alike_square_table_with_t_equal_b(how):
    torch.manual_seed(0)
    _refused_or_exact_and_private(_Table(how).double(), _x(3, 3, 3, seed=0))


_MIXED = {  # make_private (probe on), bk; GradClipper measured identical
    "sum0": "sum(0) of the bias's rows broadcast back: rel err 3.1, sensitivity 1.416 C",
    "amax0": "amax(0): rel err 1.11, sensitivity 1.032 C",
    "bcast_add": "(s[:, None] + z).mean(1): out_dim puts z's batch on dim 0 (it is dim 1): "
                 "rel err 1.11, sensitivity 1.032 C",
    "bcast_matmul": "(s[:, None] @ z).mean(1): rel err 0.488, sensitivity 1.301 C",
    "emb_bcast_matmul": "the same with a (1, T) position lookup (new matmul batch-dim "
                        "exemption): GradClipper rel err 1.77, sensitivity 1.829 C",
    "tflat_roll": "transpose(0, 1).reshape(-1).roll(T): the batch's dimension is unknown, "
                  "so the TAINTED value is let through: rel err 1.84, sensitivity 1.185 C",
    "unbind_stack": "stack(reversed(z.unbind(0))): rel err 0.445, sensitivity 1.122 C",
    "split_cat": "cat(reversed(z.split(1))): rel err 0.445, sensitivity 1.122 C",
    "repeat_narrow": "z.repeat(2, 1, 1)[1:B + 1]: rel err 0.896, sensitivity 1.055 C",
}


# Fixed: broadcasting ops align from the right (out_dim); tainted rows are held
# to the virtual rows' rules (no reduction, split, repeat or innermost flatten
# along the batch).
_FIXED = {"emb_bcast_matmul", "split_cat", "repeat_narrow", "sum0", "amax0", "bcast_add",
          "bcast_matmul", "tflat_roll", "unbind_stack"}


@pytest.mark.parametrize("how", [
    pytest.param(h, marks=pytest.mark.xfail(strict=True, raises=NOT_FIXED,
                                            reason=f"measured: {m}, no error"))
    if h not in _FIXED else h for h, m in _MIXED.items()])
def test_broadcast_rows_mixed_across_examples_are_refused_or_exact(how):
    model, x = _rel(how), _x()
    run = _clipper_sum(model) if how.startswith("emb_") else None
    _refused_or_exact_and_private(model, x, run)


# fixed (was: measured before the fix)
def test_shared_value_changed_in_place_after_meeting_the_batch():
    model, x = _rel("inplace_after_meet"), _x()
    _refused_or_exact_and_private(model, x, _clipper_sum(model))


# fixed (was: measured before the fix)
def test_merged_batch_meeting_a_shared_value():
    model, x = _rel("merged_meet"), _x()
    _refused_or_exact_and_private(model, x, _clipper_sum(model))


@pytest.mark.xfail(strict=True, raises=NOT_FIXED, reason=(
    "measured: data laundered through .tolist() into a batch-free F.linear (refused before "
    "this change, now run as shared), added as `s - s.detach()` so the forward is unchanged "
    "and the probe is blind: make_private sensitivity 1.057 C, relative error 0.16, no error"))
def test_laundered_batch_statistic_in_a_batch_free_use():
    class Launder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, T)

        def forward(self, x: Tensor) -> Tensor:
            st = torch.tensor(x.mean((0, 1)).tolist(), dtype=x.dtype)
            s = F.linear(st, self.lin.weight)  # no operand carries the batch
            return self.lin(x) + (s - s.detach())

    torch.manual_seed(0)
    _refused_or_exact_and_private(Launder().double(), 2 * _x())
