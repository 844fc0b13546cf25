"""Adversarial review of the loss trace (``clipping/loss_trace.py``): ordinary user code.

The trace refuses, at ``loss.backward()`` on the first step of each output
signature, a loss whose reduction does not match ``loss_reduction`` or whose
per-example weights depend on the batch. These tests are ordinary ways of
writing a loss that the trace gets wrong:

* false negatives: a token mean over the batch, or a misdeclared reduction,
  that trains silently (held to the neighbour-sensitivity bound
  ``max_j ||S(D) - S(D without j)|| <= C`` with
  :func:`support.sensitivity.neighbour_sensitivity`, float64);
* bypasses of the check on the checked step;
* false refusals of losses that decompose (held to the one-example-at-a-time
  reference);
* ordinary code broken by the ``Traced`` outputs, and exceptions leaking out
  of the check.

Each ``xfail(strict=True)`` asserts the correct behaviour (a ``SwiftDPError``
refusal, a bounded sensitivity, exact gradients, or the plain-PyTorch result)
and records what was measured; it flips to XPASS, failing the suite, once
fixed. The plain tests are attacks that hold.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections import OrderedDict

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
B, D, K, T = 6, 4, 3, 20
C = 0.5
BOUND = C * (1 + 1e-6)


# ------------------------------------------------------------------ fixtures
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def _data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64), torch.randint(0, K, (B,), generator=g)


class TokenModel(nn.Module):
    """(B, T, D) -> (B, T, K) logits, token by token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(D, K).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def _tokens() -> tuple[Tensor, Tensor]:
    """Example 0 has T real tokens, the others one each (-100 elsewhere), all alike."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, D, generator=g, dtype=F64).expand(B, T, D).clone() * 0.3
    labels = torch.full((B, T), -100)
    labels[:, 0] = 1
    labels[0] = 2
    return x, labels


def _linear() -> nn.Module:
    """A zero-initialised regression head: small, unclipped, aligned per-example gradients."""
    m = nn.Linear(D, K).double()
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    return m


def _regression() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, D, generator=g, dtype=F64).expand(B, D).clone()
    return x, torch.full((B, K), 0.015, dtype=F64)


def _per(o: Tensor, t: Tensor) -> Tensor:
    """Per-example squared error, (B,): the rows of a decomposable loss."""
    return ((o - t) ** 2).sum(1)


def _ce_none(o: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(o, y, reduction="none")


def _tok_none(o: Tensor, lab: Tensor) -> Tensor:
    return F.cross_entropy(o.reshape(-1, K), lab.reshape(-1), reduction="none")


def _sensitivity(make, step, batch, reduction="mean", before=None, mode="bk",
                check=True) -> float:
    """Neighbour sensitivity of the clipped sum of one ``step(out, target)``.

    ``before(model, x, y)`` runs earlier steps on the same clipper (the
    checked step), their gradients discarded.
    """
    def run(b):
        xs, ys = b
        model = make()
        clipper = swiftdp.GradClipper(model, C, loss_reduction=reduction, mode=mode,
                                      check_loss=check)
        try:
            if before is not None:
                before(model, xs, ys)
                for p in model.parameters():
                    p.grad = None
            step(model(xs), ys)
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]
    return neighbour_sensitivity(run, batch, len(batch[1]))


def _refused_or_bounded(make, step, batch, reduction="mean", before=None) -> None:
    """The correct behaviour: a swiftdp refusal, or a sensitivity of at most C."""
    try:
        s = _sensitivity(make, step, batch, reduction, before)
    except SwiftDPError:
        return
    assert s <= BOUND, f"accepted silently, neighbour sensitivity {s / C:.2f} C"


# ============================================== 1. token means the trace cannot see
def _masked_mean(o, lab):  # HF-style: per-token losses, padding dropped by a boolean mask
    return _tok_none(o, lab)[lab.reshape(-1) != -100].mean()


def _masked_select_mean(o, lab):
    return torch.masked_select(_tok_none(o, lab), lab.reshape(-1) != -100).mean()


def _logits_of_real_tokens(o, lab):  # the selection before the loss
    keep = lab != -100
    return F.cross_entropy(o[keep], lab[keep])


def _nanmean(o, lab):
    return _tok_none(o, lab).masked_fill(lab.reshape(-1) == -100, float("nan")).nanmean()


def _gather_nll_masked_mean(o, lab):
    lp = o.log_softmax(-1)
    nll = -lp.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1)
    return nll[lab != -100].mean()


def _movedim(o, lab):  # (B, K, T) input, as with transpose(1, 2) (which is caught)
    return F.cross_entropy(o.movedim(2, 1), lab)


def _type_cast(o, lab):  # .type(dtype) instead of .float()/.to(dtype)
    return F.cross_entropy(o.type(torch.float64).reshape(-1, K), lab.reshape(-1))


def _cat_chunks(o, lab):  # outputs of micro-chunks concatenated back
    return F.cross_entropy(torch.cat([o[:3], o[3:]]).reshape(-1, K), lab.reshape(-1))


HIDDEN_TOKEN_MEANS = [
    ("losses[mask].mean()", _masked_mean),
    ("masked_select-mean", _masked_select_mean),
    ("ce(logits[mask], labels[mask])", _logits_of_real_tokens),
    ("nanmean", _nanmean),
    ("gather-nll[mask].mean()", _gather_nll_masked_mean),
    ("ce(logits.movedim(2,1))", _movedim),
    ("ce(logits.type(f64))", _type_cast),
    ("ce(cat(chunks))", _cat_chunks),
]


@pytest.mark.parametrize(("case", "loss_fn"), HIDDEN_TOKEN_MEANS,
                         ids=[c[0] for c in HIDDEN_TOKEN_MEANS])
def test_a_token_mean_over_the_batch_written_another_way_is_refused(case, loss_fn):
    _refused_or_bounded(TokenModel, lambda o, lab: loss_fn(o, lab).backward(), _tokens())


CAUGHT_TOKEN_MEANS = [
    ("ce-view", lambda o, lab: F.cross_entropy(o.view(-1, K), lab.view(-1))),
    ("nn.CrossEntropyLoss", lambda o, lab: nn.CrossEntropyLoss(ignore_index=-100)(
        o.view(-1, K), lab.view(-1))),
    ("flatten(0,1)", lambda o, lab: F.cross_entropy(o.flatten(0, 1), lab.flatten())),
    ("transpose(1,2)", lambda o, lab: F.cross_entropy(o.transpose(1, 2), lab)),
    ("permute", lambda o, lab: F.cross_entropy(o.permute(0, 2, 1), lab)),
    ("hf-shift", lambda o, lab: F.cross_entropy(o[..., :-1, :].contiguous().view(-1, K),
                                                lab[..., 1:].contiguous().view(-1))),
    ("log_softmax+nll", lambda o, lab: F.nll_loss(torch.log_softmax(o, -1).view(-1, K),
                                                  lab.view(-1))),
    ("sum/(labels!=-100).sum()", lambda o, lab: _tok_none(o, lab).sum() / (lab != -100).sum()),
    ("where-sum/count", lambda o, lab: torch.where(lab.reshape(-1) != -100, _tok_none(o, lab),
                                                   0.0).sum() / (lab != -100).sum()),
    ("sum/count.item()", lambda o, lab: _tok_none(o, lab).sum() / (lab != -100).sum().item()),
]


@pytest.mark.parametrize(("case", "loss_fn"), CAUGHT_TOKEN_MEANS,
                         ids=[c[0] for c in CAUGHT_TOKEN_MEANS])
def test_the_hugging_face_token_means_the_trace_models_are_refused(case, loss_fn):
    model = TokenModel()
    clipper = swiftdp.GradClipper(model, C)
    x, lab = _tokens()
    try:
        with pytest.raises(SwiftDPError):
            loss_fn(model(x), lab).backward()
    finally:
        clipper.remove()
    assert all(p.grad is None for p in model.parameters())


# ========================================= 2. misdeclared reductions through other ops
def _accumulate(o, t):  # total = torch.zeros(()); total += loss_of_each_head
    total = torch.zeros((), dtype=F64)
    total += _per(o, t).sum()
    return total


SUMS_UNDER_MEAN = [
    ("nansum", lambda o, t: _per(o, t).nansum()),
    ("einsum('b->')", lambda o, t: torch.einsum("b->", _per(o, t))),
    ("tensor-accumulator +=", _accumulate),
    ("stack of per-example losses .sum()",
     lambda o, t: torch.stack([_per(o[i:i + 1], t[i:i + 1]).sum() for i in range(len(t))]).sum()),
    ("mean * torch.tensor(B)", lambda o, t: _per(o, t).mean() * torch.tensor(len(t))),
    ("losses @ ones", lambda o, t: _per(o, t) @ torch.ones(len(t), dtype=F64)),
]


@pytest.mark.parametrize(("case", "loss_fn"), SUMS_UNDER_MEAN, ids=[c[0] for c in SUMS_UNDER_MEAN])
def test_a_sum_under_loss_reduction_mean_written_another_way_is_refused(case, loss_fn):
    _refused_or_bounded(_linear, lambda o, t: loss_fn(o, t).backward(), _regression())


def test_the_plain_sum_under_mean_is_refused_and_would_leak():
    # The calibration of the cases above: .sum() under mean is refused, and without the
    # check the same loss leaks 1.64 C.
    with pytest.raises(SwiftDPError):
        _sensitivity(_linear, lambda o, t: _per(o, t).sum().backward(), _regression())
    s = _sensitivity(_linear, lambda o, t: _per(o, t).sum().backward(), _regression(),
                     check=False)
    assert s > 1.5 * C


@pytest.mark.parametrize("case", ["nanmean", "sum/count.item()"])
def test_a_token_mean_under_loss_reduction_sum_is_refused(case):
    def loss(o, lab):
        if case == "nanmean":
            return _nanmean(o, lab)
        return F.cross_entropy(o.reshape(-1, K), lab.reshape(-1), reduction="sum") / (
            (lab != -100).sum().item() + 0.5)  # + 0.5: never equal to B, as real counts
    _refused_or_bounded(TokenModel, lambda o, lab: loss(o, lab).backward(), _tokens(), "sum")


# ======================================================== 3. bypasses on the checked step
@pytest.mark.parametrize("case", ["token-mean", "sum-under-mean", "tensors=kwarg"])
def test_torch_autograd_backward_is_checked(case):
    if case == "token-mean":
        _refused_or_bounded(TokenModel, lambda o, lab: torch.autograd.backward(
            F.cross_entropy(o.reshape(-1, K), lab.reshape(-1))), _tokens())
    elif case == "sum-under-mean":
        _refused_or_bounded(_linear, lambda o, t: torch.autograd.backward(_per(o, t).sum()),
                            _regression())
    else:
        _refused_or_bounded(_linear, lambda o, t: torch.autograd.backward(
            tensors=[_per(o, t).sum()]), _regression())


@pytest.mark.parametrize("case", ["ones", "ones/n_tokens"])
def test_a_vector_backward_with_a_gradient_is_checked(case):
    if case == "ones":
        _refused_or_bounded(_linear, lambda o, t: _per(o, t).backward(
            torch.ones(len(t), dtype=F64)), _regression())
    else:
        def step(o, lab):
            losses = _tok_none(o, lab)
            losses.backward(torch.ones_like(losses) / (lab != -100).sum())
        _refused_or_bounded(TokenModel, step, _tokens())


def test_retrying_a_refused_backward_is_refused_again():
    def retry(o, t):
        loss = _per(o, t).sum()
        try:
            loss.backward()
        except SwiftDPError:
            loss.backward()
    _refused_or_bounded(_linear, retry, _regression())


def test_a_token_mean_is_refused_when_the_first_batch_had_no_padding():
    def clean_first(model, x, lab):  # e.g. a first batch of long, truncated documents
        F.cross_entropy(model(x).reshape(-1, K), torch.ones_like(lab).reshape(-1)).backward()
    _refused_or_bounded(TokenModel, lambda o, lab: F.cross_entropy(
        o.reshape(-1, K), lab.reshape(-1)).backward(), _tokens(), before=clean_first)


@dataclasses.dataclass
class _Output:
    logits: Tensor


class _ModelOutput(OrderedDict):  # transformers.ModelOutput-like (a dict subclass)
    def __getattr__(self, k):
        return self[k]


class _Wrapped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.m = kind, _linear()

    def forward(self, x):
        o = self.m(x)
        return _Output(o) if self.kind == "dataclass" else _ModelOutput(logits=o)


@pytest.mark.parametrize("kind", ["dataclass", "ModelOutput-like"])
def test_outputs_in_a_model_output_container_are_checked(kind):
    _refused_or_bounded(lambda: _Wrapped(kind), lambda o, t: _per(o.logits, t).sum().backward(),
                        _regression())


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_outputs_in_a_dict_or_tuple_are_checked(kind):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _mlp()

        def forward(self, x):
            o = self.m(x)
            return {"logits": o} if kind == "dict" else (o, o.pow(2))

    model = M()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    out = model(x)
    logits = out["logits"] if kind == "dict" else out[0]
    try:
        with pytest.raises(SwiftDPError):
            F.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        clipper.remove()


# ============================================================ 4. false refusals
def _exact(loss_fn, reduction="mean", targets=False):
    """Held to the one-example-at-a-time reference; ``targets``: pass (y, y2, teacher)."""
    x, y = _data()
    t = (y, y.flip(0), _TEACHER) if targets else y
    want, _ = reference_clipped_sum(_mlp(), loss_fn, x, t, C)
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C, loss_reduction=reduction)
    try:
        loss_fn(model(x), t).backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < 1e-9


_PRIOR = torch.tensor([1.5, 1.2, 1.9], dtype=F64)
_TEACHER = torch.randn(B, K, generator=torch.Generator().manual_seed(5), dtype=F64)

REFUSED_BUT_DECOMPOSING = [
    ("logits / per-class prior (K,)", lambda o, y: F.cross_entropy(o / _PRIOR, y)),
    ("mse on outputs / dataset std (K,)",
     lambda o, y: F.mse_loss(o / _PRIOR, torch.zeros_like(o))),
]

# A 0-dim tensor divisor may be a count of the batch (mask.sum()): refused by design.
ZERO_DIM_DIVISORS = [
    ("kd-tensor-temperature", lambda o, y: F.kl_div(
        F.log_softmax(o / torch.tensor(2.0, dtype=F64), -1),
        F.softmax(torch.ones_like(o) / 2.0, -1), reduction="batchmean")),
    ("loss / torch.tensor(accum_steps)",
     lambda o, y: F.cross_entropy(o, y) / torch.tensor(4.0, dtype=F64)),
]


@pytest.mark.xfail(strict=True, reason="by design (documented, said in the message): a 0-dim "
                   "tensor divisor is read as a possible count of the batch (mask.sum(), measured "
                   "1.87 C when accepted) and refused; divide by a Python number instead")
@pytest.mark.parametrize(("case", "loss_fn"), ZERO_DIM_DIVISORS,
                         ids=[c[0] for c in ZERO_DIM_DIVISORS])
def test_a_division_by_a_0_dim_constant_tensor_is_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


@pytest.mark.parametrize(("case", "loss_fn"), REFUSED_BUT_DECOMPOSING,
                         ids=[c[0] for c in REFUSED_BUT_DECOMPOSING])
def test_a_division_by_a_constant_tensor_is_accepted_and_exact(case, loss_fn):
    _exact(loss_fn)


@pytest.mark.xfail(strict=True, reason="by design (documented, and said in the message): a Python "
                   "number equal to B is read as the batch size, so loss / grad_accum_steps with "
                   "steps == B is refused as B-dependent")
def test_loss_over_grad_accum_steps_equal_to_the_batch_size_is_accepted():
    _exact(lambda o, y: F.cross_entropy(o, y) / 6)  # grad_accum_steps = 6 = B


ACCEPTED = [
    ("label-smoothing", lambda o, t: F.cross_entropy(o, t[0], label_smoothing=0.1)),
    ("kd-batchmean-float-T", lambda o, t: 4.0 * F.kl_div(
        F.log_softmax(o / 2.0, -1), F.softmax(t[2] / 2.0, -1), reduction="batchmean")),
    ("focal", lambda o, t: ((1 - torch.exp(-_ce_none(o, t[0]))) ** 2 * _ce_none(o, t[0])).mean()),
    ("mixup", lambda o, t: 0.3 * F.cross_entropy(o, t[0]) + 0.7 * F.cross_entropy(o, t[1])),
    ("loss / accum 4", lambda o, t: F.cross_entropy(o, t[0]) / 4),
    ("ce + entropy", lambda o, t: F.cross_entropy(o, t[0]) - 0.01 * (
        o.softmax(-1) * o.log_softmax(-1)).sum(-1).mean()),
    ("logit-adjust", lambda o, t: F.cross_entropy(o - _PRIOR.log(), t[0])),
    ("soft-targets", lambda o, t: F.cross_entropy(o, F.softmax(t[2], -1))),
    ("bce-pos-weight", lambda o, t: F.binary_cross_entropy_with_logits(
        o, F.one_hot(t[0], K).double(), pos_weight=2 * torch.ones(K, dtype=F64))),
    ("sum(python list of two means)", lambda o, t: sum(
        [F.cross_entropy(o, t[0]), F.mse_loss(o, torch.zeros_like(o))])),
]


@pytest.mark.parametrize(("case", "loss_fn"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_ordinary_decomposing_losses_are_accepted_and_exact(case, loss_fn):
    _exact(loss_fn, targets=True)


def test_grad_scaler_scaling_is_refused():
    # (was accepted: the engine then clipped the scaled per-example gradients, an effective
    # threshold of C / scale, and the scaler's inf check read the sums before the noise)
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    try:
        with pytest.raises(swiftdp.InvalidArgumentError, match="GradScaler"):
            scaler.scale(F.cross_entropy(model(x), y))
    finally:
        clipper.remove()
    assert model[0].weight.grad is None


# ===================================================== 5. ordinary code on the first step
def _first_step(fn):
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    try:
        return fn(model, x, y)
    finally:
        clipper.remove()


def test_formatting_the_loss_in_an_f_string_works():
    def fn(model, x, y):
        loss = F.cross_entropy(model(x), y)
        text = f"loss {loss:.4f}"
        loss.backward()
        return text
    assert _first_step(fn).startswith("loss ")


def test_a_compiled_loss_function_runs_on_the_first_step():
    loss_fn = torch.compile(lambda o, t: F.cross_entropy(o, t), backend="eager")
    _first_step(lambda model, x, y: loss_fn(model(x), y).backward())


def _hooked_first_step():
    def fn(model, x, y):
        out = model(x)
        calls = []
        out.register_hook(lambda g: calls.append(g.detach().clone()))
        out.retain_grad()
        F.cross_entropy(out, y).backward()
        return out, calls

    out, calls = _first_step(fn)
    model = _mlp()
    x, y = _data()
    plain = model(x)
    want, = torch.autograd.grad(F.cross_entropy(plain, y), plain)
    return out, calls, want


def test_retained_output_gradients_see_one_backward():
    out, _calls, want = _hooked_first_step()
    assert torch.allclose(out.grad, want)  # the check's own passes are undone


@pytest.mark.xfail(strict=True, reason="by design (documented): the second-derivative check "
                   "differentiates through the user's output on the checked step, so a tensor "
                   "hook on it fires 4 times instead of once (retained .grad is restored)")
def test_output_hooks_see_one_backward():
    _out, calls, _want = _hooked_first_step()
    assert len(calls) == 1


def test_ordinary_uses_of_the_traced_outputs_work():
    def fn(model, x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        acc = (out.argmax(1) == y).double().mean().item()
        value = loss.item()
        arr = out.detach().numpy()
        history = [out.detach()]
        buf = io.BytesIO()
        torch.save({"out": out.detach()}, buf)
        twin = copy.deepcopy(loss.detach())
        out.clamp_(-5, 5)  # in place on the output
        loss = F.cross_entropy(out, y)
        loss.backward()
        return acc, value, arr, history, twin

    _acc, value, arr, history, twin = _first_step(fn)
    assert isinstance(value, float) and arr.shape == (B, K) and type(twin) is Tensor
    # a value detached before the backward is traced (a batch statistic of it must not
    # enter the loss), and stays so after the step (a carried value must not enter a later
    # step's loss or forward); it computes and saves as a tensor
    assert isinstance(history[0], Tensor) and isinstance(history[0] + 1, Tensor)
    buf = io.BytesIO()
    torch.save(history[0], buf)
    buf.seek(0)
    assert type(torch.load(buf)) is Tensor


def _first_step_repr_and_type():
    def fn(model, x, y):
        out = model(x)
        text, kind = repr(out), type(out)
        F.cross_entropy(out, y).backward()
        return text, kind
    return _first_step(fn)


def test_the_first_step_outputs_print_like_tensors():
    text, _kind = _first_step_repr_and_type()
    assert text.startswith("tensor(")


@pytest.mark.xfail(strict=True, reason="by design (documented): at every step the outputs "
                   "are a Tensor subclass (Traced, read for the loss check), so type(out) is "
                   "Tensor is False; isinstance(out, Tensor) holds")
def test_the_first_step_outputs_type_like_tensors():
    _text, kind = _first_step_repr_and_type()
    assert kind is Tensor


def test_in_place_ops_on_the_outputs_of_later_steps_work():
    def fn(model, x, y):
        for _ in range(3):
            out = model(x)
            out.clamp_(-5, 5)
            out[:, 0] = 0
            F.cross_entropy(out, y).backward()
    _first_step(fn)


# ========================================================= 6. exceptions from the check
LACKING_SECOND_DERIVATIVES = [
    # CTC's mean divides each example by its own target length: it decomposes.
    ("ctc_loss", lambda o, y: F.ctc_loss(
        o.log_softmax(-1)[None].expand(5, len(y), K), torch.ones(len(y), 2, dtype=torch.long),
        torch.full((len(y),), 5), torch.full((len(y),), 2))),
    ("cdist", lambda o, y: torch.cdist(o[:, None], torch.zeros(len(y), 1, K, dtype=F64)).mean()),
]


@pytest.mark.parametrize(("case", "loss_fn"), LACKING_SECOND_DERIVATIVES,
                         ids=[c[0] for c in LACKING_SECOND_DERIVATIVES])
def test_a_loss_without_second_derivatives_trains_or_is_refused_by_swiftdp(case, loss_fn):
    model = _mlp()
    clipper = swiftdp.GradClipper(model, C)
    x, y = _data()
    try:
        loss_fn(model(x), y).backward()
    except SwiftDPError:
        return
    finally:
        clipper.remove()
    assert model[0].weight.grad is not None
