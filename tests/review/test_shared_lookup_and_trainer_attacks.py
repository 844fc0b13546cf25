"""Adversarial review: shared-index embedding lookups (8e9f043) and DPTrainer (8eed930).

A lookup whose indices do not derive from the batch and have a size-1 batch
dimension (``pos(torch.arange(T)[None])``) is expanded to the batch and its
output marked as a *virtual* batch; later ops must keep its rows aligned with
the examples (``batchdim.check_virtual``). That check is shape-based: any op
whose output keeps the input's leading shape is taken as row-aligned, so ops
that permute or mix rows *along* the batch (``flip(0)``, ``p[perm]``,
``cumsum(0)``, ``ones(B, B) @ p``) are accepted. Their forward is unchanged
(every virtual row holds the same values), so ``make_private``'s independence
probe cannot see them either, but the row credited to example ``i`` then holds
other examples' output gradients.

Each ``xfail(strict=True)`` asserts the correct behaviour (a ``SwiftDPError``,
or an exact clipped sum / neighbour sensitivity <= C) and records what was
measured; plain tests are attacks that hold.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.accounting.accountant import PrivacyAccountant
from swiftdp.errors import SwiftDPError
from swiftdp.integrations.trainer import DPTrainer

logging.getLogger("absl").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F64 = torch.float64
V, T, B, D = 11, 5, 4, 3
C = 0.05
TOL = 1e-9
NOT_FIXED = (AssertionError, pytest.fail.Exception)


class _FlipGrad(torch.autograd.Function):
    """Identity forward; the backward reverses the rows (a custom op mixing the batch)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.flip(0)


def _launder(ids: Tensor, k: int) -> Tensor:
    """Example k's tokens, through Python: the batch mark is lost, shape (1, T)."""
    k = min(k, ids.shape[0] - 1)
    return torch.tensor(ids[k:k + 1].tolist(), dtype=torch.long)


# op(module, ids, tok_out, pos_out) -> activations; pos_out is the shared (virtual) lookup
OPS = {
    "aligned": lambda s, ids, h, p: h + p,
    "two_places": lambda s, ids, h, p: torch.tanh(h + p) * p,
    "stride0_expand": lambda s, ids, h, p: h + s.pos(torch.arange(T).expand(ids.shape[0], T)),
    "inplace_mul": lambda s, ids, h, p: h + p.mul_(2.0),
    "flip0": lambda s, ids, h, p: h + p.flip(0),
    "perm_index": lambda s, ids, h, p: h + p[torch.arange(p.shape[0]).flip(0)],
    "roll0": lambda s, ids, h, p: h + torch.roll(p, 1, 0),
    "cumsum0": lambda s, ids, h, p: h + p.cumsum(0),
    "gather0": lambda s, ids, h, p: h + p.gather(
        0, torch.arange(p.shape[0]).flip(0)[:, None, None].expand(p.shape)),
    "matmul_batch": lambda s, ids, h, p: h + torch.einsum(
        "ij,jtd->itd", torch.ones(p.shape[0], p.shape[0], dtype=p.dtype), p),
    "where_flip": lambda s, ids, h, p: h + torch.where(h[..., :1] > 0, p, p.flip(0)),
    "custom_function": lambda s, ids, h, p: h + _FlipGrad.apply(p),
    "custom_function_data": lambda s, ids, h, p: _FlipGrad.apply(h) + p,
    "launder_example1": lambda s, ids, h, p: h + s.pos2(_launder(ids, 1)),
    "sum0": lambda s, ids, h, p: h + p.sum(0, keepdim=True),
    "reshape_merge": lambda s, ids, h, p: h + p.reshape(-1, D).flip(0).reshape(p.shape),
    "cat_batch": lambda s, ids, h, p: h + torch.cat([p[1:], p[:1]], 0),
}


class _Model(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.tok, self.pos, self.pos2 = nn.Embedding(V, D), nn.Embedding(T, D), nn.Embedding(V, D)
        self.head, self.op = nn.Linear(D, 2), op

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids)
        p = self.pos(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(OPS[self.op](self, ids, h, p))).mean(1)


def _make(op: str) -> nn.Module:
    torch.manual_seed(0)
    return _Model(op).to(F64)


def _data() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    return ids, torch.tensor([0, 1, 1, 0])


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def _clipper_sum(op: str, mode: str = "bk"):
    def run(data):
        x, y = data
        model = _make(op)
        clipper = swiftdp.GradClipper(model, C, mode=mode)
        try:
            _ce(model(x), y).backward()
        finally:
            clipper.remove()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in model.parameters()]
    return run


def _private_sum(op: str):
    """S through make_private (σ = 0, q = 1, SGD lr = 1): its independence probe runs too."""
    def run(data):
        x, y = data
        model = _make(op)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        dp = swiftdp.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=len(x)),
                                  noise_multiplier=0.0, max_grad_norm=C, delta=1e-4, seed=0,
                                  loss_reduction="sum")
        for xb, yb in dp.data_loader:
            F.cross_entropy(dp.model(xb), yb, reduction="sum").backward()
            dp.optimizer.step()
        qn = dp.privacy.expected_batch_size
        return [(b - p.detach()) * qn for b, p in zip(before, model.parameters(), strict=True)]
    return run


def _exact_and_private(op: str, mode: str = "bk") -> None:
    """Refused with a SwiftDPError, or exact (float64 oracle) with sensitivity <= C."""
    x, y = _data()
    want, _ = reference_clipped_sum(_make(op), _ce, x, y, C)
    run = _clipper_sum(op, mode)
    try:
        got = run((x, y))
    except SwiftDPError:
        return
    assert max_rel_error(got, want) < TOL
    assert neighbour_sensitivity(run, (x, y), B) <= C * (1 + 1e-9)


# ------------------------------------------------------------- holds
@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
@pytest.mark.parametrize("op", ["aligned", "two_places", "stride0_expand", "inplace_mul"])
def test_row_aligned_uses_of_a_shared_lookup_are_exact(op, mode):
    _exact_and_private(op, mode)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("op", ["sum0", "reshape_merge", "cat_batch"])
def test_ops_on_the_batch_free_rows_before_they_meet_the_batch_are_exact(op, mode):
    # The (1, T) lookup stays (1, T, D) until it meets the batch: these ops act on
    # its one row (no example to mix), exactly as plain PyTorch computes them.
    _exact_and_private(op, mode)


@pytest.mark.parametrize("op", ["flip0", "cumsum0"])
def test_nanobatch_is_exact_even_when_rows_are_mixed(op):
    # nanobatch runs examples one at a time, so a batch-axis op sees a batch of one.
    x, y = _data()
    want, _ = reference_clipped_sum(_make(op), _ce, x, y, C)
    assert max_rel_error(_clipper_sum(op, "nanobatch")((x, y)), want) < TOL


def test_square_indices_without_batch_dim_are_refused_even_when_t_equals_b():
    class Rel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rel = nn.Embedding(2 * B, 1)

        def forward(self, x: Tensor) -> Tensor:
            n = x.shape[1]
            return x + self.rel(torch.arange(n)[:, None] - torch.arange(n)[None] + B).squeeze(-1)

    model = Rel().to(F64)
    clipper = swiftdp.GradClipper(model, C)
    try:
        with pytest.raises(SwiftDPError):
            model(torch.randn(B, B, B, dtype=F64)).sum().backward()
    finally:
        clipper.remove()


def test_batch_derived_index_of_size_one_with_b_one_and_slice_of_batch_refused():
    class Pick(nn.Module):
        def __init__(self, first: bool) -> None:
            super().__init__()
            self.emb, self.first = nn.Embedding(V, D), first

        def forward(self, ids: Tensor) -> Tensor:
            idx = ids[:1] if self.first else ids  # batch-derived
            return self.emb(idx).sum((1, 2)) + 0 * ids.sum(1)

    x, _ = _data()
    one = x[:1]
    model = Pick(first=False).to(F64)
    want, _ = reference_clipped_sum(copy.deepcopy(model), lambda o, _y: o.sum(), one,
                                    torch.zeros(1), C)
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        model(one).sum().backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < TOL
    # a size-1 slice of the batch (example 0's tokens for everyone) is not "shared"
    bad = Pick(first=True).to(F64)
    clipper = swiftdp.GradClipper(bad, C, loss_reduction="sum")
    try:
        with pytest.raises(SwiftDPError):
            bad(x).sum().backward()
    finally:
        clipper.remove()


# ------------------------------------------------------------- findings
_MEASURED = {  # bk; ghost and per_sample measured identical
    "flip0": "rel err 0.034, sensitivity 1.022 C",
    "perm_index": "rel err 0.034, sensitivity 1.022 C",
    "roll0": "rel err 1.01, sensitivity 1.0014 C",
    "cumsum0": "rel err 1.95, sensitivity 1.086 C",
    "gather0": "rel err 0.034, sensitivity 1.022 C",
    "matmul_batch": "rel err 3.26, sensitivity 1.074 C",
    "where_flip": "rel err 0.09, sensitivity 1.0055 C",
    "custom_function": "rel err 0.066, sensitivity 1.0069 C",
    "custom_function_data": "on the batched activations themselves: 1.087 C",
}


# The tracer does not see a custom Function's backward. On the (1, T, D) lookup
# itself it is now harmless (one row, nothing to move before it meets the batch).
_STILL_OPEN = {"custom_function_data"}


@pytest.mark.parametrize("op", [
    pytest.param(op, marks=pytest.mark.xfail(
        strict=True, raises=NOT_FIXED,
        reason=f"measured: {m}, no error; a custom autograd.Function's backward that moves rows "
               "is invisible to the tracer (also for ordinary batched data, 1.087 C)"))
    if op in _STILL_OPEN else pytest.param(op)  # fixed: check_virtual refuses ops along it
    for op, m in _MEASURED.items()])
def test_shared_lookup_rows_moved_along_the_batch_are_refused_or_exact(op):
    _exact_and_private(op)


@pytest.mark.parametrize("mode", ["ghost", "per_sample"])
# fixed (was: cumsum(0) of a shared lookup, ghost/per_sample: rel err 1.95, 1.086 C)
def test_shared_lookup_cumsum_along_batch_other_modes(mode):
    _exact_and_private("cumsum0", mode)


# fixed (was: the probe does not see it, the forward is unchanged: 1.086 C through make_private)
def test_make_private_shared_lookup_cumsum_along_batch_sensitivity():
    x, y = _data()
    try:
        s = neighbour_sensitivity(_private_sum("cumsum0"), (x, y), B)
    except SwiftDPError:
        return
    assert s <= C * (1 + 1e-9)


# Was a leak (1.114 C: indices laundered from example 1 via .tolist() taken as shared);
# now refused by the independence probe's backward check (clipping/backward_probe.py).
def test_make_private_laundered_data_index_as_shared_lookup():
    x, y = _data()
    try:
        s = neighbour_sensitivity(_private_sum("launder_example1"), (x, y), B)
    except SwiftDPError:
        return
    assert s <= C * (1 + 1e-9)


# ------------------------------------------------------------- DPTrainer
TV, TT, TN, TB = 40, 6, 24, 8


class _Tokens(Dataset):
    def __init__(self, pad: bool = False) -> None:
        self.ids = torch.randint(3, TV, (TN, TT), generator=torch.Generator().manual_seed(0))
        self.pad = pad

    def __len__(self) -> int:
        return TN

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        lab = self.ids[i].clone()
        if self.pad:
            lab[1 + i % (TT - 1):] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(TT, dtype=torch.long),
                "labels": lab}


class _IterTokens(IterableDataset):
    def __iter__(self):
        d = _Tokens()
        return iter([d[i] for i in range(TN)])


def _llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
        intermediate_size=32, vocab_size=TV))


def _args(tmp_path, **kw) -> tf.TrainingArguments:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": TB, "num_train_epochs": 1,
            "report_to": [], "save_strategy": "no", "logging_steps": 1, "use_cpu": True,
            "learning_rate": 1e-3, "remove_unused_columns": False, "disable_tqdm": True}
    return tf.TrainingArguments(**{**base, **kw})


PRIVACY = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "seed": 0}


def _check_private_run(trainer) -> None:
    out = trainer.train()
    dp = trainer.dp
    assert dp is not None and dp.steps == out.global_step
    ref = PrivacyAccountant("pld")
    ref.step(PRIVACY["noise_multiplier"], TB / TN, dp.steps)
    assert dp.epsilon() == pytest.approx(ref.epsilon(PRIVACY["delta"]), rel=1e-9)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1] == pytest.approx(dp.epsilon(), abs=1e-4)


def _per_token_sum_over_items(outputs, labels, num_items_in_batch=None):
    lg, lb = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return F.cross_entropy(lg.float(), lb, ignore_index=-100, reduction="sum") / num_items_in_batch


def _token_mean_over_batch(outputs, labels, num_items_in_batch=None):
    lg, lb = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return F.cross_entropy(lg.float(), lb, ignore_index=-100)


@pytest.mark.parametrize("loss", [_per_token_sum_over_items, _token_mean_over_batch])
def test_trainer_compute_loss_func_with_a_batch_level_normaliser_is_refused(tmp_path, loss):
    trainer = DPTrainer(model=_llama(), args=_args(tmp_path), train_dataset=_Tokens(pad=True),
                        privacy=PRIVACY, compute_loss_func=loss)
    with pytest.raises(SwiftDPError):
        trainer.train()


@pytest.mark.parametrize("kw", [
    {"dataloader_drop_last": True, "train_sampling_strategy": "group_by_length"},
    {"eval_strategy": "steps", "eval_steps": 1},
    {"auto_find_batch_size": True},
], ids=["drop_last_group_by_length", "eval_during_training", "auto_batch_size"])
def test_trainer_ordinary_features_keep_poisson_steps_and_the_accountants_epsilon(tmp_path, kw):
    extra = {"eval_dataset": _Tokens()} if "eval_strategy" in kw else {}
    trainer = DPTrainer(model=_llama(), args=_args(tmp_path, **kw), train_dataset=_Tokens(),
                        privacy=PRIVACY, **extra)
    _check_private_run(trainer)


def test_trainer_bf16_is_refused_with_the_reason(tmp_path):
    # The Trainer's loss is a mean over the batch: in bf16 its 1/B is rounded into every
    # example's gradient (the rounding then depends on the batch: 1.025 C measured at
    # B = 1536), which the engine refuses. (It trained before the refusal.)
    trainer = DPTrainer(model=_llama(), args=_args(tmp_path, bf16=True), train_dataset=_Tokens(),
                        privacy=PRIVACY)
    with pytest.raises(SwiftDPError, match="loss_reduction='sum'"):
        trainer.train()


def test_trainer_label_smoothing_and_accumulation_refused(tmp_path):
    for kw in ({"label_smoothing_factor": 0.1}, {"gradient_accumulation_steps": 2}):
        with pytest.raises(SwiftDPError):
            DPTrainer(model=_llama(), args=_args(tmp_path, **kw), train_dataset=_Tokens(),
                      privacy=PRIVACY)


def test_trainer_iterable_dataset_is_refused(tmp_path):
    trainer = DPTrainer(model=_llama(), args=_args(tmp_path, max_steps=3),
                        train_dataset=_IterTokens(), privacy=PRIVACY)
    with pytest.raises(SwiftDPError):
        trainer.train()
