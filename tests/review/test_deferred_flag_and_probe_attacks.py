"""Review of b48190f (the ignore_index flag of a cross_entropy mean deferred to delivery in a
sync-free step) and f3a5cfa (the independence probe's backward check by tensor hooks).

Every test either holds the bound (the step refused with nothing delivered, or
``max_j ||S(D) - S(D\\j)|| <= C``) or is a strict xfail carrying the measured figure.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import swiftdp
from support.sensitivity import neighbour_sensitivity
from swiftdp.clipping.guard import IndependenceCheck
from swiftdp.errors import ExampleMixingError, StepStructureError

SLACK = 1.0 + 1e-6
V = 13


# ============================================== A. b48190f: the deferred ignore_index flag
class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # a token mean


def _coupled_batch(b: int = 8, t: int = 16) -> tuple[Tensor, Tensor]:
    """Examples 0..b-2 the same one real token (the rest padded), example b-1 all real: the
    token mean weighs each by B/N_real, and removing the last multiplies the others' by ~t/2."""
    x = torch.full((b, t), 3, dtype=torch.long)
    y = torch.full((b, t), -100, dtype=torch.long)
    y[:, 0] = 5
    y[b - 1] = 5
    x[b - 1] = torch.randint(0, V, (t,), generator=torch.Generator().manual_seed(0))
    return x, y


def _base() -> tuple[nn.Module, float]:
    """The model and C = the norm of one real token's gradient (unclipped alone, clipped in
    the coupled sum only when its weight grows)."""
    torch.manual_seed(0)
    model = _Tokens()
    x, y = _coupled_batch()
    m = copy.deepcopy(model)
    g = torch.autograd.grad(_ce(m(x[:1, :1]), y[:1, :1]), list(m.parameters()))
    return model, float(torch.sqrt(sum((t ** 2).sum() for t in g))) * 1.0001


def _grads(model: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _clipper(model: nn.Module, c: float, sync: bool, **kw) -> swiftdp.GradClipper:
    clip = swiftdp.GradClipper(model, c, **kw)
    clip.sync_free = sync
    return clip


def _refused_or_bounded(run, batch, b: int, c: float) -> None:
    try:
        s = neighbour_sensitivity(run, batch, b)
    except ExampleMixingError:
        return
    assert s <= c * SLACK, f"delivered, sensitivity {s / c:.3f} C"


# ---------------------------------------------------- A1. retrying the refused backward
def _retry_run(base: nn.Module, c: float, mode: str, sync: bool):
    def run(batch):
        xb, yb = batch
        model = copy.deepcopy(base)
        clip = _clipper(model, c, sync, mode=mode)
        try:
            loss = _ce(model(xb), yb)
            try:
                loss.backward(retain_graph=True)
            except ExampleMixingError:
                loss.backward()  # the user catches the refusal and tries again
        finally:
            clip.remove()
        return _grads(model)
    return run


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_retrying_a_deferred_refusal_is_refused_again(mode):
    """Fixed after the review (measured 3.78 C in bk and per_sample): the flags are kept
    while one is set, so the retried backward of the same graph is refused again."""
    base, c = _base()
    x, y = _coupled_batch()
    _refused_or_bounded(_retry_run(base, c, mode, True), (x, y), x.shape[0], c)


@pytest.mark.parametrize("mode", ["ghost", "nanobatch"])
def test_retry_in_ghost_and_nanobatch_delivers_nothing(mode):
    """Held, by accident: the output boundary drops its outputs on the first pass, so the
    retry fails (TypeError in boundary.py) before anything is delivered."""
    base, c = _base()
    x, y = _coupled_batch()
    with pytest.raises((ExampleMixingError, TypeError, RuntimeError)):
        _retry_run(base, c, mode, True)((x, y))


def test_cpu_path_refuses_the_retry_too():
    base, c = _base()
    x, y = _coupled_batch()
    with pytest.raises(ExampleMixingError):
        _retry_run(base, c, "bk", False)((x, y))


def _private_run(base: nn.Module, c, sync: bool, chunks: int | None):
    def run(batch):
        xb, yb = batch
        n = xb.shape[0]
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loader = torch.utils.data.DataLoader(list(range(n)), batch_size=n,
                                             collate_fn=lambda idx: (xb[idx], yb[idx]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = swiftdp.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=c,
                                      poisson_sampling=False, seed=0,
                                      max_physical_batch_size=chunks)
        dp.clipper.sync_free = sync
        before = [p.detach().clone() for p in model.parameters()]
        for xc, yc in dp.data_loader:
            dp.optimizer.zero_grad()
            loss = _ce(model(xc), yc)
            try:
                loss.backward(retain_graph=True)
            except ExampleMixingError:
                loss.backward()
            dp.optimizer.step()
        eb = dp.optimizer.settings.expected_batch_size
        return [(b0 - p.detach()) * eb for b0, p in zip(before, model.parameters(), strict=True)]
    return run


@pytest.mark.parametrize("chunks,groups", [(None, False), (4, False), (None, True)])
def test_retry_through_make_private_is_not_stepped(chunks, groups):
    """Fixed after the review (measured: 3.78 C in one chunk, 1.65 C with
    max_physical_batch_size=4, 2.13 C with two groups)."""
    base, c = _base()
    x, y = _coupled_batch()
    thr = {"emb": c / 2 ** 0.5, "head": c / 2 ** 0.5} if groups else c
    _refused_or_bounded(_private_run(base, thr, True, chunks), (x, y), x.shape[0], c)


# ---------------------------------------- A2. what was held: every step with the flag set
def _two_terms(model, clip, x, y):
    out = model(x)
    (_ce(out, y) + 0.1 * out.pow(2).mean()).backward()


def _dp_scalar(model, clip, x, y):
    clip.backward(_ce(model(x), y))


def _dp_vector(model, clip, x, y):
    out = model(x)
    clean = y.clamp(min=0)
    own = F.cross_entropy(out.transpose(1, 2), clean, reduction="none").mean(1)
    clip.backward(own + 0.0 * _ce(out, y))


def _autograd_backward(model, clip, x, y):
    torch.autograd.backward([_ce(model(x), y)])


def _flag_on_first_forward(model, clip, x, y):
    o1, o2 = model(x), model(x)  # two forwards, one backward of both
    (_ce(o1, y) + _ce(o2, y.clamp(min=0))).backward()


LOSSES = {"two_terms": _two_terms, "dp_scalar": _dp_scalar, "dp_vector": _dp_vector,
          "autograd_backward": _autograd_backward, "two_forwards": _flag_on_first_forward}


@pytest.mark.parametrize("how", sorted(LOSSES))
@pytest.mark.parametrize("mode,groups", [("bk", False), ("bk", True), ("ghost", False),
                                         ("per_sample", False), ("nanobatch", False)])
def test_a_set_flag_refuses_the_step_with_nothing_delivered(how, mode, groups):
    if how == "two_forwards" and mode in ("ghost", "nanobatch"):
        pytest.skip("one forward per backward in these modes (refused on both paths)")
    torch.manual_seed(1)
    model = _Tokens()
    x, y = torch.randint(0, V, (4, 5)), torch.randint(0, V, (4, 5))
    y[1, 2] = -100
    thr = {"emb": 0.7, "head": 0.7} if groups else 1.0
    clip = _clipper(model, thr, True, mode=mode)  # type: ignore[arg-type]
    try:
        for _ in range(2):  # past the first checked steps
            for p in model.parameters():
                p.grad = None
            _ce(model(x), y.clamp(min=0)).backward()
        for p in model.parameters():
            p.grad = None
        # (a token mean added to per-example losses is refused by its form before the
        # flag is read: it combines each example's entries with a value over the batch)
        why = "reduced over the batch" if how == "dp_vector" else "ignore_index"
        with pytest.raises(ExampleMixingError, match=why):
            LOSSES[how](model, clip, x, y)
        assert all(p.grad is None for p in model.parameters()), "a refused step delivered"
    finally:
        clip.remove()


def _own_mean(out: Tensor, y: Tensor) -> Tensor:
    """Each example's mean over its own real tokens (a (B,) vector for dp.backward)."""
    tok = F.cross_entropy(out.transpose(1, 2), y, reduction="none")
    real = (y != -100).to(tok.dtype)
    return (tok * real).sum(1) / real.sum(1).clamp(min=1)


def _chunked_run(refuse_first: bool) -> tuple[list[Tensor], int]:
    torch.manual_seed(2)
    model = _Tokens()
    x, y = torch.randint(0, V, (4, 5)), torch.randint(0, V, (4, 5))
    y[3, 1] = -100  # chunk 0 (rows 0-1) clean, chunk 1 (rows 2-3) has a padded target
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=4,
                                         collate_fn=lambda _: (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=1.0,
                                  poisson_sampling=False, seed=0, max_physical_batch_size=2)
    dp.clipper.sync_free = True
    before = [p.detach().clone() for p in model.parameters()]
    chunks = iter(dp.data_loader)
    xb, yb = next(chunks)
    dp.optimizer.zero_grad()
    _ce(model(xb), yb).backward()
    dp.optimizer.step()  # mid logical batch: accumulates
    xb, yb = next(chunks)
    if refuse_first:
        dp.optimizer.zero_grad()
        with pytest.raises(ExampleMixingError):
            _ce(model(xb), yb).backward()  # caught by the user ...
        with pytest.raises(StepStructureError, match="not backpropagated"):
            dp.optimizer.step()  # ... who steps anyway: refused, nothing moves
        assert dp.optimizer.steps_taken == 0
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        with pytest.raises(StepStructureError, match="was not called"):
            next(iter(dp.data_loader))  # no silent move to the next batch either
    dp.optimizer.zero_grad()
    dp.clipper.backward(_own_mean(model(xb), yb))  # the chunk again, one loss per example
    dp.optimizer.step()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], \
        dp.optimizer.steps_taken


def test_a_refusal_caught_then_step_releases_nothing():
    """Caught refusal, then optimizer.step(): refused, nothing moves or is accounted; the
    chunk redone with per-example losses steps exactly what a run without the refusal steps
    (the refused backward left nothing in the private accumulators)."""
    got, n = _chunked_run(True)
    want, m = _chunked_run(False)
    assert n == m == 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------- A3. a flag left over from a forward
@pytest.mark.xfail(strict=True, raises=ExampleMixingError, reason=(
    "measured: false refusal. A cross_entropy mean with a padded target computed on a forward "
    "that is never backpropagated (a logged loss) leaves its flag in the step; the next "
    "forward joins the same Step (not started), and its clean backward is refused at "
    "delivery in bk and per_sample; the CPU path delivers it"))
@pytest.mark.parametrize("mode", ["bk", "per_sample"])
def test_a_flag_of_a_forward_never_backpropagated_does_not_refuse_the_next(mode):
    torch.manual_seed(3)
    base = _Tokens()
    x, y = torch.randint(0, V, (4, 5)), torch.randint(0, V, (4, 5))
    bad = y.clone()
    bad[0, 0] = -100
    got = []
    for sync in (False, True):
        model = copy.deepcopy(base)
        clip = _clipper(model, 1.0, sync, mode=mode)
        try:
            _ = _ce(model(x), bad)  # for the log only
            _ce(model(x), y).backward()
        finally:
            clip.remove()
        got.append(_grads(model))
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b)


# -------------------------------------------- A4. the flag deferred to another step
class _Passthrough(nn.Module):
    """Returns its (float) input too: a traced output whose graph reaches no capture."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.b(torch.tanh(self.a(x))), x * 1.0


def _pass_setup() -> tuple[nn.Module, float, Tensor, Tensor]:
    torch.manual_seed(0)
    model = _Passthrough()
    b, t = 8, 16
    x = torch.zeros(b, t, 6)
    x[..., 2] = 1.0
    x[b - 1] = torch.randn(t, 6, generator=torch.Generator().manual_seed(1))
    y = torch.full((b, t), -100, dtype=torch.long)
    y[:, 0] = 4
    y[b - 1] = 4
    m = copy.deepcopy(model)
    g = torch.autograd.grad(_ce(m(x[:1, :1])[0], y[:1, :1]), list(m.parameters()))
    return model, float(torch.sqrt(sum((u ** 2).sum() for u in g))) * 1.0001, x, y


def _cross_step_run(base: nn.Module, c: float, sync: bool, how: str):
    def run(batch):
        xb, yb = batch
        model = copy.deepcopy(base)
        clip = _clipper(model, c, sync)
        try:
            o1, aux1 = model(torch.randn(xb.shape).requires_grad_(True))
            o1.mean().backward()  # step 1 delivered; aux1 keeps its (dead) context
            for p in model.parameters():
                p.grad = None
            o2, _ = model(xb)
            loss = _ce(aux1 * 0.0 + o2, yb)  # the first traced operand's context: step 1's
            if how == "dp_backward":
                clip.backward(loss)
            else:  # step 1's root is left alone; a clean root of step 2 passes its check
                torch.autograd.backward([loss, o2.mean() * 0.0])
        finally:
            clip.remove()
        return _grads(model)
    return run


def test_a_flag_deferred_to_a_delivered_steps_context_via_dp_backward():
    base, c, x, y = _pass_setup()
    _refused_or_bounded(_cross_step_run(base, c, True, "dp_backward"), (x, y), x.shape[0], c)


# fixed on the CPU path (was a strict xfail, 3.85 C, B = 8, T = 16: Step.check_traced_loss
# returns for a root of a step that is not current, so the coupled loss was checked by
# nobody; a second, clean root of step 2 set its loss_checked): a value of the delivered
# step's outputs entering the current step's loss is now coupled. Sync-free it is refused
# since the deferred flag is filed with the current step.
@pytest.mark.parametrize("sync", [True, False])
def test_a_coupled_root_of_a_delivered_steps_context_with_an_extra_root(sync):
    base, c, x, y = _pass_setup()
    _refused_or_bounded(_cross_step_run(base, c, sync, "roots"), (x, y), x.shape[0], c)


# ============================================= B. f3a5cfa: the probe's backward check
class _Flip(torch.autograd.Function):
    """Identity forward; the backward adds twice the reversed rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g + 2 * g.flip(0)


class _FlipInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.mark_dirty(x)
        return x.mul_(1.0)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g + 2 * g.flip(0)


def _st(h: Tensor, k: float = 1.0) -> Tensor:
    r = h.roll(1, 0)
    return h + k * (r - r.detach())


def _hook(h: Tensor) -> Tensor:
    if h.requires_grad:
        h.register_hook(lambda g: g + 2 * g.roll(1, 0))
    return h


MIX = {"st": _st, "fn": _Flip.apply, "hook": _hook}
_B = 4
_IDS = torch.randint(0, 9, (_B, 5), generator=torch.Generator().manual_seed(0))
_YS = torch.randint(0, 3, (_B,), generator=torch.Generator().manual_seed(1))
_XS = torch.randn(_B, 5, generator=torch.Generator().manual_seed(2)) * 10


def _ce_sum(out, y: Tensor) -> Tensor:
    if isinstance(out, tuple):
        out = out[0]
    return F.cross_entropy(out, y, reduction="sum")


def _probe_run(model: nn.Module, c: float, loss=_ce_sum, before=None):
    def run(batch):
        *a, y = batch
        for p in model.parameters():
            p.grad = None
        clip = swiftdp.GradClipper(model, c, loss_reduction="sum")
        chk = IndependenceCheck(model, clip)
        try:
            if before is not None:
                before(model, a, y)
            loss(model(*a), y).backward()
        finally:
            chk.remove()
            clip.remove()
        return _grads(model)
    return run


def _probe_refused_or_bounded(model, args, ys, c=1.0, **kw) -> None:
    try:
        s = neighbour_sensitivity(_probe_run(model, c, **kw), (*args, ys), ys.shape[0])
    except (ExampleMixingError, swiftdp.errors.UnsupportedModuleError):
        return
    assert s <= c * SLACK, f"accepted, sensitivity {s / c:.3f} C"


def _scaled(model: nn.Module) -> nn.Module:
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


# ------------------------------------------------------- B1. reentrant checkpointing
class _CkptSide(nn.Module):
    """The mixing on a token branch; a reentrant-checkpointed side branch with trainable
    parameters that no probed point is upstream of."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)
        self.tok = nn.Embedding(9, 4)
        self.tok.weight.requires_grad_(False)
        self.shift, self.lin = nn.Parameter(torch.zeros(4)), nn.Linear(4, 4)

    def side(self, ids: Tensor) -> Tensor:
        return checkpoint(lambda h: torch.tanh(self.lin(h)).mean(1), self.tok(ids) + self.shift,
                          use_reentrant=True)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(_st(torch.tanh(self.emb(ids)).mean(1), 8.0) + self.side(ids))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_probe_mixing_next_to_a_reentrant_checkpoint_is_refused():
    torch.manual_seed(1)
    model = _CkptSide().double()
    ids = torch.randint(0, 9, (1, 5), generator=torch.Generator().manual_seed(3)).repeat(_B, 1)
    with torch.no_grad():
        y = model(ids).clone()
    y[2] += 5.0  # one loud example, the others at their own output (zero loss)

    def mse(o, t):
        return ((o - t) ** 2).sum()
    _probe_refused_or_bounded(model, (ids,), y, loss=mse)


# ----------------------------------------------- B2. nothing trainable to differentiate to
class _Prompted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 6), nn.Linear(6, 3)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, ids: Tensor, prompt: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids).mean(1) + prompt))


def test_probe_with_no_trainable_parameter_and_no_float_input_does_not_crash():
    model = _Prompted()
    clip = swiftdp.GradClipper(model, 1.0)
    chk = IndependenceCheck(model, clip)
    try:
        model(_IDS, torch.zeros(6, requires_grad=True))
    finally:
        chk.remove()
        clip.remove()


# ------------------------------------------- B3. what was held (same verdict as before)
# Measured with the pre-change check_backward swapped in: the same verdict in all 30 cases
# (refused, or accepted at 1.000 C where no trainable parameter is below the mixing).
def _models(mix):
    class LateOnly(nn.Module):  # float input, everything frozen but the head
        def __init__(s):
            super().__init__()
            s.a, s.b, s.head = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            for p in [*s.a.parameters(), *s.b.parameters()]:
                p.requires_grad_(False)

        def forward(s, x):
            return s.head(mix(torch.tanh(s.b(torch.tanh(s.a(x))))))

    class LateOnlyTok(nn.Module):  # no trainable parameter upstream of the mixing
        def __init__(s):
            super().__init__()
            s.emb, s.a, s.head = nn.Embedding(9, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            for p in [*s.emb.parameters(), *s.a.parameters()]:
                p.requires_grad_(False)

        def forward(s, ids):
            return s.head(mix(torch.tanh(s.a(s.emb(ids).mean(1)))))

    class MixAfterLast(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb, s.head = nn.Embedding(9, 4), nn.Linear(4, 3)

        def forward(s, ids):
            return mix(s.head(torch.tanh(s.emb(ids)).mean(1)))

    class InputOnly(nn.Module):  # the mixing on the float input, the parameters after it
        def __init__(s):
            super().__init__()
            s.head = nn.Linear(5, 3)

        def forward(s, x):
            return s.head(mix(x * 1.0))

    class Tok(nn.Module):
        def __init__(s, frozen=False):
            super().__init__()
            s.emb, s.head = nn.Embedding(9, 4), nn.Linear(4, 3)
            s.emb.weight.requires_grad_(not frozen)

        def forward(s, ids):
            return s.head(mix(torch.tanh(s.emb(ids)).mean(1)))

    class Inner(nn.Module):
        def __init__(s):
            super().__init__()
            s.a = nn.Linear(5, 4)

        def forward(s, x):
            h = s.a(x)
            return h, {"h2": torch.tanh(h)}

    class TupleDict(nn.Module):
        def __init__(s):
            super().__init__()
            s.inner, s.head = Inner(), nn.Linear(4, 3)

        def forward(s, x):
            h, d = s.inner(x)
            return s.head(mix(d["h2"]) + h)

    class PointIsOutput(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb, s.head = nn.Embedding(9, 4), nn.Linear(4, 3)

        def forward(s, ids):
            h = torch.tanh(s.emb(ids)).mean(1)
            return s.head(mix(h)), h

    class Wrap(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb = nn.Embedding(9, 4)

        def forward(s, ids):
            return s.emb(ids)  # the same tensor as its child's output

    class Nested(nn.Module):
        def __init__(s):
            super().__init__()
            s.w, s.head = Wrap(), nn.Linear(4, 3)

        def forward(s, ids):
            return s.head(mix(s.w(ids).mean(1)))

    class ViewOf(nn.Module):
        def forward(s, h):
            return h.view(h.shape[0], -1)[:, :4]

    class ViewPoint(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb, s.v, s.head = nn.Embedding(9, 4), ViewOf(), nn.Linear(4, 3)

        def forward(s, ids):
            return s.head(mix(torch.tanh(s.v(s.emb(ids)))))

    return {"late_only": (LateOnly, _XS), "late_only_tokens": (LateOnlyTok, _IDS),
            "mix_after_last": (MixAfterLast, _IDS), "input_only": (InputOnly, _XS),
            "tokens": (Tok, _IDS), "frozen_embedding": (lambda: Tok(True), _IDS),
            "tuple_dict": (TupleDict, _XS), "point_is_output": (PointIsOutput, _IDS),
            "nested_same_tensor": (Nested, _IDS), "view_of_point": (ViewPoint, _IDS)}


@pytest.mark.parametrize("name", sorted(_models(_st)))
@pytest.mark.parametrize("mix", sorted(MIX))
def test_probe_refuses_or_bounds(mix, name):
    build, a = _models(MIX[mix])[name]
    torch.manual_seed(1)
    _probe_refused_or_bounded(_scaled(build()), (a.double() if a.is_floating_point() else a,),
                              _YS)


# ------------------------------------ B4. pre-existing gaps (the old probe passed them too)
class _InnerMix(nn.Module):
    """Frozen embedding; the mixing after a functional linear inside one module."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.emb.weight.requires_grad_(False)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        z = F.linear(torch.tanh(self.emb(ids)).mean(1), self.w)
        return self.head(_Flip.apply(z))


class _InplaceMix(nn.Module):
    """The mixing applied in place (mark_dirty) to a submodule's output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(_FlipInplace.apply(self.emb(ids))).mean(1))


@pytest.mark.xfail(strict=True, reason=(
    "measured: accepted, 1.82 C (old and new probe alike): no submodule output and no "
    "float input lies between the mixing op and the parameter use the engine captures"))
def test_probe_mixing_inside_a_module_after_its_parameter_use():
    torch.manual_seed(1)
    _probe_refused_or_bounded(_scaled(_InnerMix()), (_IDS,), _YS)


@pytest.mark.xfail(strict=True, reason=(
    "measured: accepted, 1.52 C (old and new probe alike): the point is rebased by the "
    "in-place op before the probe registers its hook (or asks autograd.grad), so it reads "
    "the gradient above the mixing; a hook registered in the recording forward hook sees it"))
def test_probe_mixing_in_place_on_a_submodule_output():
    torch.manual_seed(1)
    _probe_refused_or_bounded(_scaled(_InplaceMix()), (_IDS,), _YS)


def test_probe_unfreezing_after_the_probe():
    torch.manual_seed(1)
    build, _ = _models(_Flip.apply)["frozen_embedding"]
    model = _scaled(build())

    def warm(m, a, y):
        m.emb.weight.requires_grad_(False)
        _ce_sum(m(*a), y).backward()  # probed: passes
        m.emb.weight.requires_grad_(True)
        for p in m.parameters():
            p.grad = None
    _probe_refused_or_bounded(model, (_IDS,), _YS, before=warm)


def test_sanity_design_figures_are_reachable():
    """The coupled design is what the A tests measure: the plain coupled sum is above C."""
    base, c = _base()
    x, y = _coupled_batch()

    def run(batch):
        model = copy.deepcopy(base)
        clip = _clipper(model, c, True, check_loss=False)
        try:
            _ce(model(batch[0]), batch[1]).backward()
        finally:
            clip.remove()
        return _grads(model)
    s = neighbour_sensitivity(run, (x, y), x.shape[0])
    assert s > 2 * c and math.isfinite(s)
