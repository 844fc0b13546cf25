"""The loss check under plain ``loss.backward()``: misdeclared and coupling losses are refused.

Each accepted loss is held to the one-example-at-a-time float64 reference
(``support.oracle.reference_clipped_sum``); each refusal is checked to come
before any gradient reaches a parameter; and the token mean over the batch is
shown to leak (neighbour sensitivity far above C) when the check is off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.clipping.loss_trace import Traced
from swiftdp.errors import ExampleMixingError, InvalidArgumentError

F64 = torch.float64
B, D, K, T = 6, 4, 3, 20
C = 0.5
MODES = ["bk", "ghost", "per_sample"]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def _data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64), torch.randint(0, K, (B,), generator=g)


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in model.parameters()]


def _ignored(y: Tensor) -> Tensor:
    return torch.where(torch.arange(len(y)) < 2, torch.full_like(y, -100), y)


# Losses refused at their backward: (case, loss(out, y), error, message fragment).
REFUSED = [
    ("sum-declared-mean", lambda o, y: F.cross_entropy(o, y, reduction="sum"),
     InvalidArgumentError, "sums its examples"),
    ("mean-times-B", lambda o, y: F.cross_entropy(o, y) * len(y),
     InvalidArgumentError, "sums its examples"),
    ("none-then-sum", lambda o, y: F.cross_entropy(o, y, reduction="none").sum(),
     InvalidArgumentError, "sums its examples"),
    ("ignore-index-mean", lambda o, y: F.cross_entropy(o, _ignored(y)),
     ExampleMixingError, "ignore_index=-100"),
    ("class-weights-mean", lambda o, y: F.cross_entropy(o, y, weight=torch.rand(K, dtype=F64)),
     ExampleMixingError, "class weights"),
    ("nll-ignore-index", lambda o, y: F.nll_loss(o.log_softmax(-1), _ignored(y)),
     ExampleMixingError, "ignore_index"),
    ("normalised-by-a-count", lambda o, y: (F.cross_entropy(o, y, reduction="none")
                                            * (y > 0)).sum() / (y > 0).sum(),
     ExampleMixingError, "divided by a 0-dim tensor"),
    ("sum-plus-mean", lambda o, y: F.cross_entropy(o, y) + o.pow(2).sum(),
     ExampleMixingError, "sum over the batch to a mean"),
    ("contrastive", lambda o, y: F.cross_entropy(o @ o.T, torch.arange(len(y))),
     ExampleMixingError, "not a sum of per-example terms"),
    ("log-of-the-mean", lambda o, y: torch.log(F.cross_entropy(o, y)),
     ExampleMixingError, "not a sum of per-example terms"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("case", "loss_fn", "error", "match"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_a_misdeclared_or_coupling_loss_is_refused_before_any_gradient(mode, case, loss_fn,
                                                                        error, match):
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C, mode=mode)
    x, y = _data()
    try:
        with pytest.raises(error, match=match):
            loss_fn(model(x), y).backward()
    finally:
        clipper.remove()
    assert all(g is None for g in _grads(model))


def test_a_mean_declared_as_sum_is_refused():
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    x, y = _data()
    with pytest.raises(InvalidArgumentError, match=r"averages its examples.*'sum'"):
        F.cross_entropy(model(x), y).backward()
    clipper.remove()


def _masked_token_mean(o: Tensor, y: Tensor) -> Tensor:
    mask = (torch.arange(K) <= y[:, None]).to(F64)  # per-example "real tokens"
    per = (o.pow(2) * mask).sum(1) / mask.sum(1)  # each example's mean over its own entries
    return per.mean()


# Losses that decompose, with the declared reduction: (case, loss(out, y), reduction).
ACCEPTED = [
    ("ce-mean", lambda o, y: F.cross_entropy(o, y), "mean"),
    ("ce-sum", lambda o, y: F.cross_entropy(o, y, reduction="sum"), "sum"),
    ("half-mse", lambda o, y: 0.5 * F.mse_loss(o, torch.zeros_like(o)), "mean"),
    ("none-mean", lambda o, y: F.cross_entropy(o, y, reduction="none").mean(), "mean"),
    ("sum-over-B", lambda o, y: F.cross_entropy(o, y, reduction="sum") / len(y), "mean"),
    ("per-example-mask", _masked_token_mean, "mean"),
    ("grad-scaler-style", lambda o, y: F.cross_entropy(o, y) * torch.tensor(8.0, dtype=F64),
     "mean"),
    ("einsum-rows", lambda o, y: torch.einsum("bk,bk->b", o, o).mean(), "mean"),
    ("two-means", lambda o, y: F.cross_entropy(o, y) + 0.1 * o.pow(2).mean(), "mean"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("case", "loss_fn", "reduction"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_a_decomposing_loss_passes_and_is_exact(mode, case, loss_fn, reduction):
    x, y = _data()
    ref_model = _mlp()
    want, _ = reference_clipped_sum(ref_model, loss_fn, x, y, C)
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C, mode=mode, loss_reduction=reduction)
    try:
        out = model(x)
        assert isinstance(out, Traced)  # the first step of this output signature is checked
        loss_fn(out, y).backward()
    finally:
        clipper.remove()
    got = [p.grad for p in model.parameters()]
    assert max_rel_error(got, want) < 1e-9


def test_every_step_is_traced_and_the_full_check_runs_at_powers_of_two_and_new_losses(
        monkeypatch):
    import swiftdp.clipping.step as step_module

    calls = []
    real = step_module.check_loss

    def counted(*args, **kwargs):
        calls.append(len(kinds))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "check_loss", counted)
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    kinds = []
    for n in range(1, 13):
        out = model(x)
        kinds.append(type(out))
        loss = F.cross_entropy(out, y)
        if n >= 6:  # a new term from step 6 on: a new fingerprint, checked at once
            loss = loss + 0.1 * out.pow(2).sum(1).mean()
        if n == 10:  # a new operation (a division): a new fingerprint
            loss = loss / 2.0
        if n == 11:  # a weight that moves between non-zero values: the same fingerprint
            loss = loss * 3.0
        loss.backward()
    out = model(x[:, None, :].expand(B, 2, D))  # a new output signature
    kinds.append(type(out))
    clipper.remove()
    assert kinds == [Traced] * 13
    # 1, 2, 4 (the old loss), 6 (the new one), 8 (a power of two), 10 (a new op: div)
    assert calls == [1, 2, 4, 6, 8, 10]


def test_a_caught_refusal_does_not_turn_the_check_off():
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    for _ in range(3):  # e.g. a training loop that skips batches that raise
        with pytest.raises(InvalidArgumentError):
            F.cross_entropy(model(x), y, reduction="sum").backward()
    clipper.remove()
    assert all(g is None for g in _grads(model))


def test_vector_losses_normalised_over_the_batch_are_refused():
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    out = model(x)
    mask = torch.arange(K) <= y[:, None]
    with pytest.raises(ExampleMixingError, match="divided by a 0-dim tensor"):
        clipper.backward((out.pow(2) * mask).sum(1) / mask.sum())
    clipper.remove()


# ---------------------------------------------- the token mean over the batch
class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(D, K).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, T, K) logits


def _tokens() -> tuple[Tensor, Tensor]:
    """Example 0 has T real tokens, the others one each, all alike (aligned gradients)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, D, generator=g, dtype=F64).expand(B, T, D).clone() * 0.3
    labels = torch.full((B, T), -100)
    labels[:, 0] = 1
    labels[0] = 2
    return x, labels


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    # Hugging Face's shift-free default: a mean over every real token of the batch.
    return F.cross_entropy(logits.reshape(-1, K), labels.reshape(-1))


def test_the_token_mean_over_the_batch_leaks_without_the_check_and_is_refused_with_it():
    x, labels = _tokens()

    def clipped_sum(check):
        def run(batch):
            xs, ls = batch
            model = TokenModel()
            clipper = swiftdp.GradClipper(model, C, check_loss=check)
            try:
                _token_mean(model(xs), ls).backward()
            finally:
                clipper.remove()
            return [p.grad.detach().clone() for p in model.parameters()]
        return run

    leaked = neighbour_sensitivity(clipped_sum(False), (x, labels), B)
    assert leaked > 3 * C  # measured 3.5 C: one example's token count reweights every other example
    with pytest.raises(ExampleMixingError, match="ignore_index=-100"):
        clipped_sum(True)((x, labels))


def test_the_shifted_token_mean_without_padding_is_a_mean_and_exact():
    x, _ = _tokens()
    labels = torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(2))

    def shifted(logits, lab):
        return F.cross_entropy(logits[:, :-1].reshape(-1, K), lab[:, 1:].reshape(-1))

    want, _ = reference_clipped_sum(TokenModel(), shifted, x, labels, C)
    model = TokenModel()
    clipper = swiftdp.GradClipper(model, C)
    shifted(model(x), labels).backward()
    clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9


# ------------------------------------------------------------------ make_private
def _private(**kw):
    x, y = _data()
    x, y = torch.cat([x, x]), torch.cat([y, y])
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=len(x)),
                              noise_multiplier=1.0, max_grad_norm=C, delta=1e-3, seed=0, **kw)
    return dp, model


def test_make_private_refuses_a_sum_under_the_default_mean_and_spends_nothing():
    dp, model = _private()
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(iter(dp.data_loader))
    with pytest.raises(InvalidArgumentError, match="loss_reduction='mean'"):
        F.cross_entropy(dp.model(xb), yb, reduction="sum").backward()
    assert dp.steps == 0 and dp.epsilon() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # The fixed loss trains (the refusal left no state behind).
    dp.optimizer.zero_grad()
    F.cross_entropy(dp.model(xb), yb).backward()
    dp.optimizer.step()
    assert dp.steps == 1


def test_make_private_check_loss_false_skips_the_check():
    dp, _ = _private(check_loss=False, loss_reduction="sum")
    xb, yb = next(iter(dp.data_loader))
    out = dp.model(xb)
    assert not isinstance(out, Traced)
    F.cross_entropy(out, yb, reduction="sum").backward()
    dp.optimizer.step()
    assert dp.steps == 1
