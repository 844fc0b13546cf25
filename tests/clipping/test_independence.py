"""Independence check contracts: models that mix examples are refused, naming where.

Each refused model is one an adversary measured at neighbour sensitivity
1.7–7.5 C; each accepted model trains exactly as it would without the check.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from swiftdp.clipping.guard import IndependenceCheck
from swiftdp.errors import ExampleMixingError, InvalidArgumentError, UnsupportedModuleError


class Lambda(nn.Module):
    """A parameter-free module running ``fn``: the place where mixing happens."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class Counter(nn.Module):
    """Counts its forwards (a Python attribute, not a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def _guarded(model: nn.Module, **kw) -> tuple[swiftdp.GradClipper, IndependenceCheck]:
    clipper = swiftdp.GradClipper(model, max_grad_norm=1.0, **kw)
    return clipper, IndependenceCheck(model, clipper, batch_dim=0 if clipper.batch_first else 1)


def _step(model: nn.Module, *args, **kwargs) -> None:
    out = model(*args, **kwargs)
    out = out if isinstance(out, Tensor) else sum(o.mean() for o in out)
    out.mean().backward()


def _refused(model: nn.Module, x: Tensor, module_path: str) -> ExampleMixingError:
    clipper, check = _guarded(model)
    with pytest.raises(ExampleMixingError, match=rf"Module `{module_path}` ") as info:
        _step(model, x)
    clipper.remove()
    check.remove()
    assert "check_independence=False" in str(info.value)
    assert all(p.grad is None for p in model.parameters())  # refused before the real forward
    return info.value


def _mlp_around(mixer: nn.Module, d: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), mixer, nn.Linear(8, 3))


# ------------------------------------------------------------------ refused


def test_batch_mean_centering_is_refused_naming_the_module():
    err = _refused(_mlp_around(Lambda(lambda x: x - x.mean(0))), torch.randn(5, 6), "1")
    assert isinstance(err, UnsupportedModuleError) and isinstance(err, ValueError)
    assert "(Lambda)" in str(err) and "GroupNorm/LayerNorm" in str(err)


def test_functional_batch_norm_in_training_mode_is_refused_naming_the_module():
    bn = Lambda(lambda x: F.batch_norm(x, None, None, training=True))
    _refused(_mlp_around(bn), torch.randn(5, 6), "1")


def test_group_norm_over_the_reshaped_batch_is_refused_naming_the_module():
    def batch_group_norm(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return F.group_norm(x.reshape(1, b * c, h, w), num_groups=2).reshape_as(x)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.ReLU(), Lambda(batch_group_norm)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    _refused(model, torch.randn(4, 3, 6, 6), r"1\.1")


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x: torch.roll(x, 1, dims=0), id="roll"),
        pytest.param(lambda x: torch.cat([x[::2], x[1::2]]), id="cat"),
        pytest.param(lambda x: x.reshape(x.shape[1], x.shape[0]).t(), id="reshape"),
        # A shift drops one end's example: only probing that end shows it.
        pytest.param(lambda x: F.pad(x[1:], (0, 0, 0, 1)), id="shift-up-needs-last-example"),
        pytest.param(lambda x: F.pad(x[:-1], (0, 0, 1, 0)), id="shift-down-needs-first-example"),
    ],
)
def test_ops_moving_data_across_rows_are_refused_naming_the_module(fn):
    _refused(_mlp_around(Lambda(fn)), torch.randn(5, 6), "1")


def test_attention_across_the_batch_is_refused_naming_the_module():
    def batch_attention(x: Tensor) -> Tensor:
        weights = torch.softmax(x @ x.T / math.sqrt(x.shape[1]), dim=0)  # over the batch
        return weights @ x

    _refused(_mlp_around(Lambda(batch_attention)), torch.randn(5, 6), "1")


def test_batch_sum_broadcast_back_is_refused_naming_the_module():
    _refused(_mlp_around(Lambda(lambda x: x + x.sum(0, keepdim=True))), torch.randn(5, 6), "1")


def test_mixing_in_a_modules_own_code_before_its_children_names_that_module():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x - x.mean(0))  # mixes before calling a clean child

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Tanh(), Block()))
    err = _refused(model, torch.randn(5, 6), r"1\.1")
    assert "(Block)" in str(err) and "`1.1.fc`" in str(err)


def test_buffer_updated_with_batch_statistics_is_refused_naming_the_buffer():
    class Tracker(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(8))

        def forward(self, x: Tensor) -> Tensor:
            if self.training:
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
            return x  # outputs do not mix; the released buffer does

    model = _mlp_around(Tracker())
    clipper, check = _guarded(model)
    with pytest.raises(ExampleMixingError, match=r"Buffer `1\.running_mean`.*state_dict"):
        _step(model, torch.randn(5, 6))
    assert torch.equal(model[1].running_mean, torch.zeros(8))  # restored after the probe
    clipper.remove()
    check.remove()


def test_python_branch_on_a_batch_statistic_is_refused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.Linear(6, 3)
            self.large = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            # Inputs are torch.rand (mean square 1/3); the probe's replacement row,
            # randn · (10·max|x| + 1) ≈ 11·randn, lifts the batch's mean square far
            # above 1 (≈ 121/B), so the perturbation flips this branch.
            if x.pow(2).mean() > 1.0:
                return self.large(x)
            return self.small(x)

    torch.manual_seed(0)
    err = _refused(Branchy(), torch.rand(4, 6), "<model>")
    assert "control flow" in str(err)


def test_mixing_along_the_batch_dim_of_time_major_inputs_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Lambda(lambda x: x - x.mean(1, keepdim=True)))
    clipper, check = _guarded(model, batch_first=False)
    with pytest.raises(ExampleMixingError, match=r"Module `1` \(Lambda\)"):
        _step(model, torch.randn(7, 4, 6))  # (T, B, d)
    clipper.remove()
    check.remove()


# ------------------------------------------------------------------ accepted


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(ids).mean(1))


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.emb = nn.Embedding(10, 3)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.fc(batch["x"]) + self.emb(batch["ids"]).sum(1)
        return out * batch["keep"].unsqueeze(-1)


class LSTMTagger(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, (h, _) = self.lstm(x)
        return self.head(out), h  # h is (layers, B, hidden): batch on dim 1


class TimeCentered(nn.Module):
    """(T, B, d) input centred over *time*: per-example, so it must pass with batch_dim=1."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = LSTMTagger(batch_first=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.lstm(x - x.mean(0))


def _dict_batch() -> dict[str, Tensor]:
    return {
        "x": torch.randn(5, 6),
        "ids": torch.randint(0, 10, (5, 4)),
        "keep": torch.tensor([True, False, True, True, False]),
    }


INDEPENDENT = {
    "mlp": (
        lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
        lambda: (torch.randn(5, 6),),
        {},
    ),
    "cnn-groupnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        lambda: (torch.randn(4, 3, 8, 8),),
        {},
    ),
    "transformer-dropout": (
        lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True),
        lambda: (torch.randn(4, 5, 16),),
        {},
    ),
    "lstm": (lambda: LSTMTagger(batch_first=True), lambda: (torch.randn(4, 7, 6),), {}),
    "embedding-int-input": (EmbeddingBag, lambda: (torch.randint(0, 20, (5, 7)),), {}),
    "dict-input": (DictModel, lambda: (_dict_batch(),), {}),
    "time-major-batch-dim-1": (
        TimeCentered,
        lambda: (torch.randn(7, 4, 6),),
        {"batch_first": False},
    ),
}


@pytest.mark.parametrize("name", list(INDEPENDENT))
def test_independent_models_pass_and_train_exactly_as_without_the_check(name):
    make, inputs, kw = INDEPENDENT[name]
    torch.manual_seed(0)
    checked = make()
    plain = copy.deepcopy(checked)
    torch.manual_seed(1)
    args = inputs()
    grads = []
    for model, guard in ((checked, True), (plain, False)):
        clipper = swiftdp.GradClipper(model, max_grad_norm=1.0, **kw)
        check = IndependenceCheck(model, clipper, batch_dim=0 if clipper.batch_first else 1)
        if not guard:
            check.remove()
        torch.manual_seed(2)  # the same dropout stream for both
        _step(model, *args)
        assert len(check.probed) == (1 if guard else 0)
        grads.append([p.grad for p in model.parameters()])
        clipper.remove()
        check.remove()
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)  # bitwise: the probe changed nothing


def test_probe_leaves_rng_streams_untouched_so_dropout_gradients_match_bitwise():
    torch.manual_seed(0)
    checked = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    plain = copy.deepcopy(checked)
    x = torch.randn(8, 6)
    results = []
    for model, guard in ((checked, True), (plain, False)):
        clipper = swiftdp.GradClipper(model, max_grad_norm=1.0)
        check = IndependenceCheck(model, clipper) if guard else None
        torch.manual_seed(3)
        _step(model, x)
        after = torch.rand(4)  # the stream continues where the real forward left it
        results.append(([p.grad.clone() for p in model.parameters()], after))
        clipper.remove()
        if check is not None:
            assert len(check.probed) == 1
            check.remove()
    (g_on, r_on), (g_off, r_off) = results
    assert all(torch.equal(a, b) for a, b in zip(g_on, g_off, strict=True))
    assert torch.equal(r_on, r_off)


def test_buffers_are_restored_so_only_the_real_forward_updates_them():
    class Steps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x: Tensor) -> Tensor:
            self.steps += 1  # data-independent: allowed
            return x

    model = _mlp_around(Steps())
    clipper, check = _guarded(model)
    _step(model, torch.randn(5, 6))
    assert len(check.probed) == 1 and model[1].steps.item() == 1
    clipper.remove()
    check.remove()


# ------------------------------------------------------------------ cost


def test_probe_runs_once_per_input_signature_and_again_when_the_shape_changes():
    counter = Counter()
    torch.manual_seed(0)
    model = nn.Sequential(counter, nn.Linear(6, 3))
    clipper, check = _guarded(model)
    _step(model, torch.randn(5, 6))
    assert counter.calls == 1 + 5  # the real forward; reference, examples 0 and B-1,
    # every example replaced (what is batch-free), backward
    _step(model, torch.randn(5, 6))
    assert counter.calls == 7  # same signature: no probe
    _step(model, torch.randn(7, 6))
    assert counter.calls == 8  # another batch size only (Poisson sampling): no probe
    _step(model, torch.randn(7, 4, 6))
    assert counter.calls == 9 + 5  # new example shape: probed again
    _step(model, torch.randn(7, 4, 6).double().float())
    assert counter.calls == 15
    with torch.no_grad():
        model(torch.randn(3, 6, 6))
    assert counter.calls == 16  # no probe without gradient
    model.eval()
    _step(model, torch.randn(3, 6, 6))
    assert counter.calls == 17 + 5  # eval mode is probed too (private training without dropout)
    model.train()
    _step(model, torch.randn(1, 5, 6))
    assert counter.calls == 23 + 2  # a batch of one: state written from the data only
    _step(model, torch.randn(1, 5, 6))
    assert counter.calls == 26  # ... once per signature
    _step(model, torch.randn(4, 5, 6))
    assert counter.calls == 27 + 5  # the first larger batch of that shape gets the full probe
    assert len(check.probed) == 4  # (B, 6), (B, 4, 6), (B, 6, 6), (B, 5, 6)
    clipper.remove()
    check.remove()


def test_removed_check_no_longer_probes():
    counter = Counter()
    model = nn.Sequential(counter, nn.Linear(6, 3))
    clipper, check = _guarded(model)
    check.remove()
    _step(model, torch.randn(5, 6))
    assert counter.calls == 1
    clipper.remove()


def test_negative_batch_dim_is_refused():
    model = nn.Linear(3, 2)
    clipper = swiftdp.GradClipper(model, max_grad_norm=1.0)
    with pytest.raises(InvalidArgumentError, match="batch_dim"):
        IndependenceCheck(model, clipper, batch_dim=-1)
    clipper.remove()


# ------------------------------------------- a dimension of size B that is not the batch
class _RelBias(nn.Module):
    """Scores plus a (T, T) relative-position bias, which holds no example."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.rel = nn.Embedding(2 * t, 1)
        self.q = nn.Linear(4, 4)
        self.t = t

    def forward(self, x: Tensor) -> Tensor:
        idx = torch.arange(self.t)[None, :] - torch.arange(self.t)[:, None] + self.t
        return self.q(x) @ x.transpose(1, 2) + self.rel(idx).squeeze(-1)  # (B, T, T)


class _ExpandedToken(nn.Module):
    """A parameter expanded to the batch (a CLS token), shape (B, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.p.expand(x.shape[0], -1)


class _StraightThroughOnTheToken(nn.Module):
    """The expanded token's rows moved to the next example in the backward only."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.cls, self.lin = _ExpandedToken(d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        c = self.cls(x)
        r = c.roll(1, 0)
        return self.lin(x) * (c + (r - r.detach()))


@pytest.mark.parametrize("batch", [4, 5])
def test_a_batch_free_value_with_a_dimension_of_size_b_is_not_taken_for_the_batch(batch):
    # (was: refused when the (Poisson) batch size met T, the bias's gradient from example 0
    # reading as moved to "other examples' rows"; ~4% of the CI runs of test_shared.py)
    torch.manual_seed(0)
    model = _RelBias(4).double()
    clipper, check = _guarded(model)
    try:
        x = torch.randn(batch, 4, 4, dtype=torch.float64)
        _step(model, x)
        assert all(p.grad is not None for p in model.parameters())
    finally:
        clipper.remove()
        check.remove()


@pytest.mark.parametrize("batch", [3, 4])
def test_rows_broadcast_to_the_batch_moved_in_the_backward_are_still_refused(batch):
    # data-free, but the engine credits each row to its example: B == d (4) too
    torch.manual_seed(0)
    model = _StraightThroughOnTheToken(4).double()
    clipper, check = _guarded(model)
    try:
        with pytest.raises(ExampleMixingError, match="moves gradients between examples"):
            _step(model, torch.randn(batch, 4, dtype=torch.float64))
    finally:
        clipper.remove()
        check.remove()
