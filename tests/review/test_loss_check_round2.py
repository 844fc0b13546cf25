"""Second adversarial review of the loss check (``clipping/loss_trace.py``, ``loss_forms.py``).

Not duplicated from ``test_loss_trace_attacks.py``. Three groups:

* false negatives: a coupled or misdeclared loss that trains silently, held
  to ``max_j ||S(D) - S(D without j)|| <= C`` (float64). The token fixture
  gives example 0 ``T`` real tokens and the others 2, so no token count of
  the batch or of a neighbour equals ``B`` or ``B*T`` (the first review's
  fixture made ``count == B - 1`` in one neighbour, which hid some of these);
* false refusals of ordinary decomposable losses, held to the
  one-example-at-a-time reference;
* attacks that hold (plain tests).

Each ``xfail(strict=True)`` asserts the correct behaviour and records what
was measured.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import SwiftDPError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = torch.float64
B, D, K, T, S = 6, 4, 3, 20, 2
C = 0.5
BOUND = C * (1 + 1e-6)


# ------------------------------------------------------------------ fixtures
class TokenModel(nn.Module):
    """(B, T, D) -> (B, T, K) logits token by token; ``seq_first``: (T, B, K)."""

    def __init__(self, seq_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(D, K).double()
        self.seq_first = seq_first

    def forward(self, x: Tensor) -> Tensor:
        o = self.head(x)
        return o.transpose(0, 1) if self.seq_first else o


def _tokens() -> tuple[Tensor, Tensor]:
    """Example 0 has T real tokens, the others 2 (-100 elsewhere): counts 30, 28, 10."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, D, generator=g, dtype=F64).expand(B, T, D).clone() * 0.3
    labels = torch.full((B, T), -100)
    labels[:, :2] = 1
    labels[0] = 2
    return x, labels


def _linear() -> nn.Module:
    m = nn.Linear(D, K).double()
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    return m


class Ensemble(nn.Module):
    """(S, B, K): S zero-initialised heads stacked (an ensemble, MC samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _linear(), _linear()

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.a(x), self.b(x)])


def _regression(scale: float = 1.0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, D, generator=g, dtype=F64).expand(B, D).clone()
    return x, torch.full((B, K), 0.015 * scale + shift, dtype=F64)


def _per(o: Tensor, t: Tensor) -> Tensor:
    return ((o - t) ** 2).sum(1)


def _tok(o: Tensor, lab: Tensor) -> Tensor:
    """(B, T) per-token losses (0 at padding): the batch stays on axis 0, per = 1."""
    return F.cross_entropy(o.transpose(1, 2), lab, reduction="none")


def _mask(lab: Tensor) -> Tensor:
    return (lab != -100).double()


def _sensitivity(make, step, batch, reduction="mean", before=None, check=True) -> float:
    """``step(out, target, clipper)`` runs the loss; ``before`` an earlier (checked) step."""
    def run(b):
        xs, ys = b
        model = make()
        clipper = swiftdp.GradClipper(model, C, loss_reduction=reduction, check_loss=check)
        try:
            if before is not None:
                before(model(xs), ys, clipper)
                for p in model.parameters():
                    p.grad = None
            step(model(xs), ys, clipper)
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]
    return neighbour_sensitivity(run, batch, len(batch[1]))


def _refused_or_bounded(make, step, batch, reduction="mean", before=None) -> None:
    try:
        s = _sensitivity(make, step, batch, reduction, before)
    except SwiftDPError:
        return
    assert s <= BOUND, f"accepted silently, neighbour sensitivity {s / C:.2f} C"


def _backward(fn):
    return lambda o, y, clipper: fn(o, y).backward()


# ===================================== 1. float counts and batch-normalised weights
_WEIGHTS_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "open (documented): a (B, T) weight tensor computed outside the model and normalised over "
    "the batch is read as per-example weights — the trace has no provenance for tensors built "
    "from the labels; measured 2.52 C"))

FLOAT_COUNTS_UNDER_MEAN = [
    # weights renormalised to average 1 over the batch: sum(tok*mask)/sum(mask), a token mean
    pytest.param(
        "tok * (mask * numel / mask.sum()) .mean()",
        lambda o, lab: (_tok(o, lab) * (_mask(lab) * _mask(lab).numel() / _mask(lab).sum())
                        ).mean(), marks=_WEIGHTS_XFAIL, id="tok * (mask * numel / mask.sum())"),
    # fairseq-style: each example's token sum over the batch's average length
    pytest.param("tok.sum(1) / mask.sum(1).mean() .mean()",
                 lambda o, lab: (_tok(o, lab).sum(1) / _mask(lab).sum(1).mean()).mean(),
                 id="tok.sum(1) / mask.sum(1).mean()"),
]


# (measured before the fix: accepted, 2.52 C)
@pytest.mark.parametrize(("case", "loss_fn"), FLOAT_COUNTS_UNDER_MEAN)
def test_a_token_mean_through_float_counts_under_mean_is_refused(case, loss_fn):
    _refused_or_bounded(TokenModel, _backward(loss_fn), _tokens())


FLOAT_COUNTS_UNDER_SUM = [
    ("(tok*mask).sum() / mask.sum()",
     lambda o, lab: (_tok(o, lab) * _mask(lab)).sum() / _mask(lab).sum()),
    ("tok.sum() / count.item()  (B,T) layout",
     lambda o, lab: _tok(o, lab).sum() / (lab != -100).sum().item()),
    ("ce(flat, sum) * (1 / count)",
     lambda o, lab: F.cross_entropy(o.reshape(-1, K), lab.reshape(-1), reduction="sum")
     * (1.0 / (lab != -100).sum())),
]


# (measured before the fix: accepted under loss_reduction='sum', 1.87 C)
@pytest.mark.parametrize(("case", "loss_fn"), FLOAT_COUNTS_UNDER_SUM,
                         ids=[c[0] for c in FLOAT_COUNTS_UNDER_SUM])
def test_a_token_mean_under_loss_reduction_sum_written_with_counts_is_refused(case, loss_fn):
    _refused_or_bounded(TokenModel, _backward(loss_fn), _tokens(), "sum")


@pytest.mark.parametrize("count", [
    pytest.param("item", marks=pytest.mark.xfail(strict=True, reason=(
        "open (documented): per-example losses divided by a Python number are read as scaled by "
        "a constant; a number counted from the labels is not seen (measured 1.87 C)"))),
    "float",  # (measured before the fix: 1.87 C)
])
def test_vector_losses_over_a_batch_token_count_are_refused(count):
    def step(o, lab, clipper):
        n = (lab != -100).sum()
        clipper.backward(_tok(o, lab).sum(1) / (n.item() if count == "item" else n.double()))
    _refused_or_bounded(TokenModel, step, _tokens())


def test_vector_losses_over_an_integer_count_are_refused():
    def step(o, lab, clipper):
        clipper.backward(_tok(o, lab).sum(1) / (lab != -100).sum())
    with pytest.raises(SwiftDPError):
        _sensitivity(TokenModel, step, _tokens())


# ================================================= 2. relabel lost across steps
def _clean_first(loss_fn):
    """A first batch whose targets have no padding (no ignore_index entry)."""
    return lambda o, lab, clipper: loss_fn(o, torch.ones_like(lab)).backward()


RELABEL_LOST = [
    # CE on (B, K, T): a token mean, but per == 1, so relabel is never set
    ("ce(o.transpose(1,2), lab)", lambda o, lab: F.cross_entropy(o.transpose(1, 2), lab)),
    ("ce(o.permute(0,2,1), lab)", lambda o, lab: F.cross_entropy(o.permute(0, 2, 1), lab)),
    # multi-task losses stacked: _joined keeps the first piece's form, dropping relabel
    ("stack([mse, ce-token]).sum()", lambda o, lab: torch.stack([
        F.mse_loss(o, torch.zeros_like(o)),
        F.cross_entropy(o.reshape(-1, K), lab.reshape(-1))]).sum()),
]


# fixed; was: @pytest.mark.xfail(strict=True, reason="measured: first batch without padding, then the padded " "batch trains silently — neighbour sensitivity 2.52 C (transpose/permute) " "and 2.75 C (stack)")
@pytest.mark.parametrize(("case", "loss_fn"), RELABEL_LOST, ids=[c[0] for c in RELABEL_LOST])
def test_a_token_mean_is_refused_on_a_later_padded_batch(case, loss_fn):
    _refused_or_bounded(TokenModel, _backward(loss_fn), _tokens(),
                        before=_clean_first(loss_fn))


def test_a_token_mean_added_to_another_loss_keeps_its_signature_traced():
    def loss(o, lab):
        return F.mse_loss(o, torch.zeros_like(o)) + F.cross_entropy(o.reshape(-1, K),
                                                                   lab.reshape(-1))
    with pytest.raises(SwiftDPError):
        _sensitivity(TokenModel, _backward(loss), _tokens(), before=_clean_first(loss))


# fixed (the check runs again at the 2nd, 4th, 8th, ... step of a signature); was: xfail,
# "a decomposing mean on the first step, then .sum() under loss_reduction='mean' on the
# next trains silently, measured 1.64 C"
def test_a_different_loss_on_a_later_step_is_checked():
    _refused_or_bounded(_linear, _backward(lambda o, t: _per(o, t).sum()), _regression(),
                        before=_backward(lambda o, t: _per(o, t).mean()))


# ============================================== 3. the batch axis read wrongly
AXIS_SHIFTS = [
    # logsumexp/amax/norm over a dim before the batch keep the old axis (1): the following
    # .mean(1) is read as a mean over the batch, the .sum() over the batch as over classes
    ("logsumexp(0) -> mean(1).sum()", Ensemble, _regression(4, math.log(2)),
     lambda o, t: ((o.logsumexp(0) - t) ** 2).mean(1).sum()),
    ("amax(0) -> mean(1).sum()", Ensemble, _regression(4),
     lambda o, t: ((o.amax(0) - t) ** 2).mean(1).sum()),
    # expand_as to more dims keeps axis 0 (it is now 1)
    ("expand_as(S,B,K) -> mean(0).sum()", _linear, _regression(),
     lambda o, t: ((o.expand_as(torch.empty(S, *o.shape)) - t) ** 2).mean(0).sum()),
    # broadcasting against a tensor with more dims keeps axis 0 (it is now 1)
    ("(o - t.expand(S,B,K)) -> mean(0).sum()", _linear, _regression(),
     lambda o, t: ((o - t.expand(S, *t.shape)) ** 2).mean(0).sum()),
    ("per (B,) * w (S,1) -> mean(0).sum()", _linear, _regression(),
     lambda o, t: (_per(o, t) * torch.ones(S, 1, dtype=F64)).mean(0).sum()),
]


# fixed; was: @pytest.mark.xfail(strict=True, reason="measured: a sum over the batch accepted under " "loss_reduction='mean' — 1.55 C (logsumexp), 1.55 C (amax), 1.64 C (expand_as, " "broadcast (S,B,K), (B,)*(S,1))
@pytest.mark.parametrize(("case", "make", "batch", "loss_fn"), AXIS_SHIFTS,
                         ids=[c[0] for c in AXIS_SHIFTS])
def test_a_sum_over_the_batch_behind_a_moved_axis_is_refused(case, make, batch, loss_fn):
    _refused_or_bounded(make, _backward(loss_fn), batch)


# fixed; was: @pytest.mark.xfail(strict=True, reason="measured: kl_div(reduction='batchmean') divides by " "input.size(0) = T on (T,B,K) outputs (a sum over the batch), read as a mean: " "accepted, neighbour sensit
def test_kl_div_batchmean_with_the_batch_not_first_is_refused():
    def loss(o, lab):
        return F.kl_div(o.log_softmax(-1), torch.full_like(o, 1.0 / K), reduction="batchmean")
    _refused_or_bounded(lambda: TokenModel(seq_first=True), _backward(loss), _tokens())


def test_kl_div_batchmean_with_the_batch_first_is_bounded():
    def loss(o, lab):
        o = o.transpose(0, 1)
        return F.kl_div(o.log_softmax(-1), torch.full_like(o, 1.0 / K), reduction="batchmean")
    assert _sensitivity(lambda: TokenModel(seq_first=True), _backward(loss), _tokens()) <= BOUND


# ============================================================ 4. false refusals
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g, dtype=F64), torch.randint(0, K, (B,), generator=g)


def _exact(loss_fn, make=_mlp, reduction="mean") -> None:
    x, y = _data()
    want, _ = reference_clipped_sum(make(), loss_fn, x, y, C)
    model = make()
    clipper = swiftdp.GradClipper(model, C, loss_reduction=reduction)
    try:
        loss_fn(model(x), y).backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9


def _timm_label_smoothing(x, target, smoothing=0.1):  # timm.loss.LabelSmoothingCrossEntropy
    logprobs = F.log_softmax(x, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth = -logprobs.mean(dim=-1)
    return ((1 - smoothing) * nll + smoothing * smooth).mean()


def _fairseq_label_smoothed(x, target, eps=0.1):  # fairseq label_smoothed_nll_loss
    lprobs = F.log_softmax(x, dim=-1)
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(dim=-1)
    return ((1 - eps) * nll + eps / K * smooth).mean()


_EMB = torch.randn(K, K, generator=torch.Generator().manual_seed(9), dtype=F64)

FALSELY_REFUSED = [
    ("timm LabelSmoothingCrossEntropy (gather dim=kw)", _timm_label_smoothing),
    ("fairseq label_smoothed_nll_loss", _fairseq_label_smoothed),
    ("take_along_dim(dim=1)",
     lambda o, y: -torch.take_along_dim(o.log_softmax(1), y[:, None], dim=1).mean()),
    ("where(mask, ce_none, 0).mean()",
     lambda o, y: torch.where(y > 0, F.cross_entropy(o, y, reduction="none"), 0.0).mean()),
    ("mse_loss(target, pred)", lambda o, y: F.mse_loss(F.one_hot(y, K).double(), o)),
    ("1 - cosine_similarity(o, class_emb)",
     lambda o, y: (1 - F.cosine_similarity(o, _EMB[y], dim=-1)).mean()),
    ("ce(normalize(o) * s)", lambda o, y: F.cross_entropy(F.normalize(o, dim=-1) * 10, y)),
    ("hinge with o.max(dim=1).values",
     lambda o, y: (o.max(dim=1).values - o.gather(1, y[:, None]).squeeze(1)).mean()),
    ("ce(F.linear(o, W))", lambda o, y: F.cross_entropy(F.linear(o, _EMB), y)),
    ("ce(cat(o.split([1,2], 1), 1))",
     lambda o, y: F.cross_entropy(torch.cat(o.split([1, 2], dim=1), 1), y)),
]


# fixed; was: @pytest.mark.xfail(strict=True, reason="measured: refused as unknown (gather/take_along_dim with " "dim= keyword read 'along the batch', where, mse_loss with the output as target, " "cosine_similarity
@pytest.mark.parametrize(("case", "loss_fn"), FALSELY_REFUSED,
                         ids=[c[0] for c in FALSELY_REFUSED])
def test_ordinary_decomposing_losses_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


# fixed; was: @pytest.mark.xfail(strict=True, reason="measured: a correct per-example mean after " "logsumexp/amax over the ensemble dim is refused (the batch axis is read as 1): " "ce(reduction='none') as 'batch o
@pytest.mark.parametrize("case", ["lse -> ce(none).mean()", "amax -> sum(1).mean()"])
def test_ensemble_reductions_before_the_batch_are_accepted_and_exact(case):
    def loss(o, y):
        if case.startswith("lse"):
            return F.cross_entropy(o.logsumexp(0), y, reduction="none").mean()
        return ((o.amax(0) - 0.1) ** 2).sum(1).mean()
    _exact(loss, make=Ensemble)


ACCEPTED = [
    ("timm SoftTargetCrossEntropy", lambda o, y: torch.sum(
        -(F.one_hot(y, K).double() * 0.9 + 0.1 / K) * F.log_softmax(o, dim=-1), dim=-1).mean()),
    ("poly-1", lambda o, y: (F.cross_entropy(o, y, reduction="none") + (
        1 - (F.one_hot(y, K) * o.softmax(-1)).sum(-1))).mean()),
    ("kd kl_div(log_target=True, batchmean) * T^2", lambda o, y: 4.0 * F.kl_div(
        F.log_softmax(o / 2.0, -1), torch.full_like(o, 1.0 / K).log(), reduction="batchmean",
        log_target=True)),
    ("main + 0.4 * aux head", lambda o, y: F.cross_entropy(o, y) + 0.4 * F.cross_entropy(2 * o, y)),
    ("torch.gather positional", lambda o, y: -torch.gather(o.log_softmax(1), 1, y[:, None]).mean()),
    ("per_example_cross_entropy(o[:, None]).mean()",
     lambda o, y: swiftdp.losses.per_example_cross_entropy(o[:, None], y[:, None]).mean()),
    ("bce none .mean(-1).mean()", lambda o, y: F.binary_cross_entropy_with_logits(
        o, F.one_hot(y, K).double(), reduction="none").mean(-1).mean()),
]


@pytest.mark.parametrize(("case", "loss_fn"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_these_decomposing_losses_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)
