"""Group-wise clipping (He et al. 2022) against an independent one-example-at-a-time reference.

``max_grad_norm={prefix: C_k}``: example ``i``'s gradient restricted to group
``k`` is clipped to ``C_k`` with its own norm, so the clipped sum moves by at
most ``S = √Σ_k C_k²`` when one example is added or removed, and the noise
is ``σ·S`` on every coordinate. The reference below computes each example's
gradient by its own forward and backward with plain autograd, assigns
parameters to groups by name itself and clips each group itself (no
swiftdp code).
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error
from support.sensitivity import neighbour_sensitivity
from swiftdp.accounting import PrivacyAccountant
from swiftdp.errors import InvalidArgumentError

MODES = ("bk", "ghost", "per_sample", "nanobatch")
TOL = 1e-10


# ------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)  # a group no example reaches: clipped sum zero

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(F.relu(self.norm(self.conv(x))))
        return self.fc(h.mean((2, 3)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.enc(self.emb(x) + self.pos).mean(1))


def _mlp_data(g: torch.Generator, b: int = 9) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def _conv_data(g: torch.Generator, b: int = 6) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def _seq_data(g: torch.Generator, b: int = 6) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 13, (b, 5), generator=g), torch.randint(0, 3, (b,), generator=g)


CASES = {
    "mlp": (MLP, _mlp_data, ("encoder.0", "encoder.2", "head", "unused")),
    "conv": (ConvNet, _conv_data, ("conv", "norm", "dw", "fc")),
    "transformer": (Encoder, _seq_data, ("emb", "pos", "enc", "fc")),
}


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


# --------------------------------------------------------------- reference
def group_reference(model: nn.Module, xs: Tensor, ys: Tensor, groups: dict[str, float],
                    clipping: str = "flat") -> tuple[list[Tensor], Tensor]:
    """Σ_i Σ_k c_ik g_ik one example at a time, and the (K, B) per-group norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = list(groups)
    member = []
    for n, _ in named:
        hits = [k for k, g in enumerate(names) if n == g or n.startswith(g + ".")]
        assert len(hits) == 1, (n, hits)
        member.append(hits[0])
    sums = [torch.zeros_like(p) for _, p in named]
    norms = torch.zeros(len(names), len(xs), dtype=torch.float64)
    for i in range(len(xs)):
        loss = _ce(model(xs[i:i + 1]), ys[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads, strict=True)]
        factors = []
        for k, g in enumerate(names):
            n_k = math.sqrt(sum(float((gr.double() ** 2).sum())
                                for gr, m in zip(grads, member, strict=True) if m == k))
            norms[k, i] = n_k
            c_k = groups[g]
            factors.append(min(1.0, c_k / (n_k + 1e-6)) if clipping == "flat" else c_k / (n_k + 0.01))
        for s, gr, m in zip(sums, grads, member, strict=True):
            s.add_(gr, alpha=factors[m])
    return sums, norms


def _engine_sum(model: nn.Module, xs: Tensor, ys: Tensor, groups: dict[str, float], mode: str,
                reduction: str, clipping: str = "flat") -> tuple[list[Tensor], swiftdp.GradClipper]:
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(model, groups, mode=mode, loss_reduction=reduction,  # type: ignore[arg-type]
                                  clipping=clipping)  # type: ignore[arg-type]
    try:
        losses = _ce(model(xs), ys)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    finally:
        clipper.remove()
    got = [p.grad if p.grad is not None else torch.zeros_like(p)
           for p in model.parameters() if p.requires_grad]
    return got, clipper


def _median_thresholds(model: nn.Module, xs: Tensor, ys: Tensor, names: tuple[str, ...]
                       ) -> dict[str, float]:
    """C_k = the median group-k norm: about half the examples clipped in each group."""
    _, norms = group_reference(model, xs, ys, dict.fromkeys(names, math.inf))
    return {g: float(norms[k].median()) or 1.0 for k, g in enumerate(names)}


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_group_clipped_sum_matches_one_example_at_a_time_reference(case, mode, reduction):
    build, data, names = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = data(torch.Generator().manual_seed(1))
    groups = _median_thresholds(model, xs, ys, names)
    want, want_norms = group_reference(model, xs, ys, groups)
    got, clipper = _engine_sum(model, xs, ys, groups, mode, reduction)
    err = max_rel_error(got, want)  # type: ignore[arg-type]
    assert err <= TOL, f"{case}/{mode}/{reduction}: rel. error {err:.2e}"
    assert clipper.last_norms is not None and clipper.last_clip_factors is not None
    assert clipper.last_norms.shape == (len(names), len(xs))  # one row per group
    nerr = float((clipper.last_norms.double() - want_norms).abs().max() / want_norms.max())
    assert nerr <= TOL
    clipped = clipper.last_clip_factors < 1
    assert bool(clipped.any()) and not bool(clipped.all())  # the test exercises both sides


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_automatic_style_per_group(mode):
    torch.manual_seed(0)
    model = MLP().double()
    xs, ys = _mlp_data(torch.Generator().manual_seed(2))
    groups = {"encoder": 0.4, "head": 0.2, "unused": 1.0}
    want, _ = group_reference(model, xs, ys, groups, clipping="automatic")
    got, _ = _engine_sum(model, xs, ys, groups, mode, "mean", clipping="automatic")
    assert max_rel_error(got, want) <= TOL  # type: ignore[arg-type]


def test_tied_weights_inside_one_group_are_one_gradient():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(7, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.tok.weight  # named tok.weight and head.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.mid(self.tok(x)))).mean(1)[:, :3]

    torch.manual_seed(0)
    model = Tied().double()
    xs, ys = torch.randint(0, 7, (6, 4)), torch.randint(0, 3, (6,))
    groups = {"tok": 0.05, "mid": 0.05}  # head.weight is tok.weight: in the 'tok' group
    want, _ = group_reference(model, xs, ys, groups)
    for mode in ("bk", "ghost"):
        got, _ = _engine_sum(model, xs, ys, groups, mode, "mean")
        assert max_rel_error(got, want) <= TOL  # type: ignore[arg-type]


def test_one_group_covering_everything_is_the_float_threshold_path():
    torch.manual_seed(0)
    model = MLP().double()
    xs, ys = _mlp_data(torch.Generator().manual_seed(3))
    for mode in MODES:
        grouped, _ = _engine_sum(model, xs, ys, {"": 0.3}, mode, "mean")
        for p in model.parameters():
            p.grad = None
        clipper = swiftdp.GradClipper(model, 0.3, mode=mode)  # type: ignore[arg-type]
        F.cross_entropy(model(xs), ys).backward()
        clipper.remove()
        flat = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        assert max_rel_error(grouped, flat) <= 1e-14  # type: ignore[arg-type]
        assert clipper.last_norms is not None and clipper.last_norms.shape == (len(xs),)


@pytest.mark.parametrize("mode", ["bk", "ghost", "nanobatch"])
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_neighbour_sensitivity_is_at_most_and_reaches_root_sum_of_squares(mode, clipping):
    torch.manual_seed(0)
    model = MLP().double()
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(7, 5, generator=g, dtype=torch.float64) * 30.0  # large gradients
    ys = torch.randint(0, 3, (7,), generator=g)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    groups = {"encoder.0": 0.3, "encoder.2": 0.2, "head": 0.6, "unused": 0.1}
    bound = math.sqrt(sum(c * c for c in groups.values()))

    def run(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return _engine_sum(model, batch[0], batch[1], groups, mode, "mean", clipping)[0]

    sens = neighbour_sensitivity(run, (xs, ys), len(xs))
    assert sens <= bound * (1 + 1e-9)
    # every example clipped in every group it reaches: its removal moves the sum by ≈ S
    # (the 'unused' group is never reached, so S without it is the largest possible move)
    reached = math.sqrt(bound**2 - groups["unused"] ** 2)
    assert sens >= 0.99 * reached


def test_privacy_settings_carry_the_root_sum_of_squares_sensitivity():
    model = MLP().double()
    ds = TensorDataset(torch.zeros(50, 5, dtype=torch.float64), torch.zeros(50, dtype=torch.long))
    groups = {"encoder": 0.3, "head": 0.4, "unused": 1.2}
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(ds, batch_size=5), max_grad_norm=groups,
                              noise_multiplier=2.0, steps=3, delta=1e-3)
    assert dp.privacy.max_grad_norm == (("encoder", 0.3), ("head", 0.4), ("unused", 1.2))
    assert dp.privacy.sensitivity() == pytest.approx(1.3, rel=1e-15)
    assert dp.privacy.noise_std() == pytest.approx(2.6, rel=1e-15)
    assert dp.clipper.group_limits == (0.3, 0.4, 1.2)
    groups["head"] = 100.0  # the caller's dict is copied: changing it changes nothing
    assert dp.privacy.sensitivity() == pytest.approx(1.3, rel=1e-15)
    assert dp.clipper.group_limits == (0.3, 0.4, 1.2)
    with pytest.raises(AttributeError):
        dp.clipper.group_limits = (10.0, 10.0, 10.0)  # type: ignore[misc]


def test_noise_std_is_sigma_times_root_sum_of_squares_on_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100, bias=False), nn.Linear(100, 60, bias=False)).double()
    for p in model.parameters():
        nn.init.zeros_(p)
    ds = TensorDataset(torch.zeros(100, 200, dtype=torch.float64),
                       torch.zeros(100, 60, dtype=torch.float64))
    sigma, c0, c1 = 1.3, 0.3, 0.4  # S = 0.5; σ·C_k alone would be 40 % or 20 % off
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                              DataLoader(ds, batch_size=10), noise_multiplier=sigma,
                              max_grad_norm={"0": c0, "1": c1}, seed=5, delta=1e-3)
    x, y = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    F.mse_loss(dp.model(x), y).backward()  # zero gradients: the update is the noise alone
    dp.optimizer.step()
    want = sigma * math.hypot(c0, c1) / 10.0
    for p in model.parameters():
        delta = -p.detach().flatten()
        n = delta.numel()
        ratio = delta.std().item() / want
        assert abs(ratio - 1) < 5 / math.sqrt(2 * n), ratio  # 5 standard errors
        assert abs(delta.mean().item()) < 5 * want / math.sqrt(n)
    a, b = (p.detach().flatten() for p in model.parameters())
    corr = statistics.correlation(a[:6000].tolist(), b.tolist())
    assert abs(corr) < 5 / math.sqrt(6000)  # independent noise on the two groups


def test_epsilon_is_the_float_threshold_runs_with_the_same_sigma_q_and_steps():
    eps = []
    for c in ({"encoder": 0.3, "head": 0.2, "unused": 0.5}, 0.7):
        torch.manual_seed(0)
        model = MLP().double()
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(60, 5, generator=g, dtype=torch.float64),
                           torch.randint(0, 3, (60,), generator=g))
        dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  DataLoader(ds, batch_size=6), max_grad_norm=c,
                                  noise_multiplier=1.1, steps=6, seed=3, delta=1e-4)
        for _, (x, y) in zip(range(6), dp.data_loader, strict=False):
            dp.optimizer.zero_grad()
            if len(x):
                F.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
        eps.append((dp.privacy.noise_multiplier, dp.steps, dp.epsilon()))
    assert eps[0] == eps[1]
    acc = PrivacyAccountant("pld")
    acc.step(eps[0][0], 0.1, eps[0][1])
    assert eps[0][2] == pytest.approx(acc.epsilon(1e-4), rel=1e-12)


# ------------------------------------------------------------ refusals
def _refused(groups: object, match: str, model: nn.Module | None = None) -> None:
    m = model if model is not None else MLP().double()
    with pytest.raises(InvalidArgumentError, match=match):
        swiftdp.GradClipper(m, groups)  # type: ignore[arg-type]
    assert not m._forward_pre_hooks  # nothing attached by a refused engine
    ds = TensorDataset(torch.zeros(20, 5, dtype=torch.float64), torch.zeros(20, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match=match):
        swiftdp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                             DataLoader(ds, batch_size=5), max_grad_norm=groups,  # type: ignore[arg-type]
                             noise_multiplier=1.0, steps=1)


def test_a_parameter_in_no_group_is_refused_naming_it_and_the_fix():
    _refused({"encoder": 1.0, "unused": 1.0}, r"`head\.weight` is in no group.*'head': C")


def test_a_parameter_in_two_groups_is_refused_naming_both():
    _refused({"encoder": 1.0, "encoder.2": 1.0, "head": 1.0, "unused": 1.0},
             r"`encoder\.2\.weight` is in 2 groups.*'encoder', 'encoder\.2'")


def test_a_prefix_is_a_module_path_not_a_string_prefix():
    # 'encode' is not a module of the model: it covers nothing ('encoder.0.weight' is not in it)
    _refused({"encode": 1.0, "encoder": 1.0, "head": 1.0, "unused": 1.0},
             r"group 'encode' of max_grad_norm covers no trainable parameter")


def test_tied_weights_across_two_groups_are_refused():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.tok(x))

    _refused({"tok": 1.0, "head": 1.0}, r"`tok\.weight` \(also named `head\.weight`: tied\) "
             r"is in 2 groups", Tied())


@pytest.mark.parametrize("bad, match", [
    ({}, "at least one group"),
    ({"head": -1.0, "encoder": 1.0}, r"max_grad_norm\['head'\] > 0"),
    ({"head": float("nan")}, r"max_grad_norm\['head'\] > 0"),
    ({1: 1.0}, "distinct module-name prefixes"),
    ([1.0, 0.5], "needs pipeline_stage="),
])
def test_malformed_thresholds_are_refused(bad, match):
    _refused(bad, match)


def test_a_parameter_unfrozen_later_outside_the_groups_is_refused_before_its_forward():
    torch.manual_seed(0)
    model = MLP().double()
    model.head.requires_grad_(False)
    clipper = swiftdp.GradClipper(model, {"encoder": 1.0, "unused": 1.0})
    xs, ys = _mlp_data(torch.Generator().manual_seed(5))
    F.cross_entropy(model(xs), ys).backward()  # fine while frozen
    model.head.requires_grad_(True)
    with pytest.raises(InvalidArgumentError, match=r"`head\.weight` is in no group"):
        model(xs)
    model.head.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(xs), ys).backward()  # the engine is still usable
    clipper.remove()


def test_a_group_run_checkpoint_resumes_only_with_the_same_groups(tmp_path):
    from swiftdp.errors import CheckpointError

    def run(groups: dict[str, float]) -> swiftdp.PrivateTraining:
        torch.manual_seed(0)
        model = MLP().double()
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(40, 5, generator=g, dtype=torch.float64),
                           torch.randint(0, 3, (40,), generator=g))
        return swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    DataLoader(ds, batch_size=5), max_grad_norm=groups,
                                    noise_multiplier=1.0, steps=4, seed=1, delta=1e-3)

    groups = {"encoder": 0.3, "head": 0.2, "unused": 0.5}
    dp = run(groups)
    for _, (x, y) in zip(range(2), dp.data_loader, strict=False):
        dp.optimizer.zero_grad()
        if len(x):
            F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
    dp.save_checkpoint(tmp_path / "ck.pt")
    again = run(groups)
    again.load_checkpoint(tmp_path / "ck.pt")
    assert again.steps == 2
    other = run({"encoder": 0.3, "head": 0.9, "unused": 0.5})
    with pytest.raises(CheckpointError, match="max_grad_norm"):
        other.load_checkpoint(tmp_path / "ck.pt")


# ----------------------------------------------------- per-layer thresholds
class _Tied(nn.Module):
    """A root parameter, a block with two layers, and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.block(self.emb(ids) * self.scale)).mean(1)


def test_per_layer_thresholds_group_each_layer_once_with_total_sensitivity_c():
    groups = swiftdp.per_layer_thresholds(_Tied(), 2.0)
    assert list(groups) == ["scale", "emb", "block.0", "block.1"]  # head: tied to emb
    assert math.sqrt(sum(c * c for c in groups.values())) == pytest.approx(2.0, rel=1e-15)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert swiftdp.per_layer_thresholds(mlp, 1.0) == pytest.approx({"0": 0.5 ** 0.5, "2": 0.5 ** 0.5})
    with pytest.raises(InvalidArgumentError, match="max_grad_norm"):
        swiftdp.per_layer_thresholds(mlp, -1.0)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_per_layer_clipping_is_exact_and_bounded_by_c(mode):
    torch.manual_seed(3)
    model = _Tied().double()
    groups = swiftdp.per_layer_thresholds(model, 0.05)  # far below the norms: all clipped
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    ys = torch.randint(0, 7, (6,), generator=g)
    want, _ = group_reference(model, ids, ys, groups)
    got, _ = _engine_sum(model, ids, ys, groups, mode, "sum")
    assert max_rel_error(got, want) < 1e-12

    def clipped(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return _engine_sum(model, batch[0], batch[1], groups, mode, "sum")[0]

    sens = neighbour_sensitivity(clipped, (ids, ys), 6)
    assert 0.99 * 0.05 <= sens <= 0.05 * (1 + 1e-9)
