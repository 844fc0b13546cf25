"""Adaptive clipping (Andrew et al. 2021) against independent references.

* With σ = 0 (no noise anywhere) every step's update equals the
  one-example-at-a-time clipped sum at the threshold the test itself tracks
  with the paper's rule ``C ← C·exp(−η(b − γ))``, ``b = Σ_i (b_i − ½)/(q·N) + ½``
  the centred fraction of the batch's examples with norm ≤ C (``b_i`` = 1
  for those), for one C and for groups.
* The released pair (clipped sum, centred count) is one Gaussian mechanism of
  multiplier σ: removing any one example moves it by at most 1 in the
  noise's units (neighbour probe), the gradient's noise std is σ_g·C with
  σ_g⁻² = σ⁻² − (2σ_b/√K)⁻², the count's noise std is σ_b (both measured),
  and ε equals dp-accounting's RDP of the Poisson-sampled composition of the
  two Gaussians (and PLD of one Gaussian of multiplier σ).
* Misuse is refused: a count noise too small for σ, automatic clipping,
  set_max_grad_norm on an adaptive run, a threshold changed on the engine only.
"""

from __future__ import annotations

import math
import statistics

import dp_accounting as dpa
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.errors import InvalidArgumentError, StepStructureError

N, BATCH, LR = 40, 10, 0.5


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, dtype=torch.float64, generator=g) * 2,
                         torch.randint(0, 3, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _private(model: nn.Module, data: TensorDataset, sigma: float, c: object,
             adaptive: swiftdp.AdaptiveClipping, batch: int = BATCH, **kw: object):
    return swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                                DataLoader(data, batch_size=batch), max_grad_norm=c,  # type: ignore[arg-type]
                                noise_multiplier=sigma, steps=8, seed=3, loss_reduction="sum",
                                adaptive_clipping=adaptive, **kw)  # type: ignore[arg-type]


def _group_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 groups: list[list[nn.Parameter]]) -> list[list[float]]:
    """Each example's gradient norm on each group, one example at a time (plain autograd)."""
    out = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, [p for g in groups for p in g])
        norms, k = [], 0
        for g in groups:
            part = grads[k:k + len(g)]
            k += len(g)
            norms.append(math.sqrt(sum(float((t ** 2).sum()) for t in part)))
        out.append(norms)
    return out


def test_flat_adaptive_update_and_threshold_follow_the_papers_rule():
    data, model = _data(), _model()
    ref = _model()
    ada = swiftdp.AdaptiveClipping(target_quantile=0.7, learning_rate=0.3)
    dp = _private(model, data, 0.0, 0.5, ada)
    c, qn = 0.5, float(BATCH)
    trajectory = []
    for step, (x, y) in zip(range(6), dp.data_loader, strict=False):
        assert dp.privacy.max_grad_norm == pytest.approx(c, rel=1e-12)
        trajectory.append(dp.privacy.max_grad_norm)
        dp.optimizer.zero_grad()
        if len(y):
            F.cross_entropy(dp.model(x), y, reduction="sum").backward()
        want, _ = reference_clipped_sum(ref, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                        x, y, c) if len(y) else ([torch.zeros_like(p) for p in
                                                                   ref.parameters()], None)
        norms = [n[0] for n in _group_norms(ref, x, y, [list(ref.parameters())])]
        dp.optimizer.step()
        with torch.no_grad():
            for p, w in zip(ref.parameters(), want, strict=True):
                p.sub_(LR * w / qn)
        assert max_rel_error(list(model.parameters()), list(ref.parameters())) < 1e-12, step
        b = (sum(n <= c for n in norms) - len(y) / 2) / qn + 0.5  # σ = 0: no count noise
        c = c * math.exp(-0.3 * (b - 0.7))
    assert len(set(trajectory)) > 3  # the threshold moved


def test_group_thresholds_adapt_each_to_its_own_groups_norms():
    data, model = _data(), _model()
    ref = _model()
    ada = swiftdp.AdaptiveClipping(target_quantile=0.5, learning_rate=0.5)
    dp = _private(model, data, 0.0, {"0": 0.3, "2": 2.0}, ada)
    cs, qn = [0.3, 2.0], float(BATCH)
    groups = [list(ref[0].parameters()), list(ref[2].parameters())]
    for step, (x, y) in zip(range(5), dp.data_loader, strict=False):
        assert [v for _, v in dp.privacy.max_grad_norm] == pytest.approx(cs, rel=1e-12), step
        dp.optimizer.zero_grad()
        if len(y):
            F.cross_entropy(dp.model(x), y, reduction="sum").backward()
        norms = _group_norms(ref, x, y, groups)
        sums = [torch.zeros_like(p) for g in groups for p in g]
        for i in range(len(y)):  # each group clipped on its own (plain autograd)
            loss = F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, [p for g in groups for p in g])
            for j, g in enumerate(grads):
                k = 0 if j < len(groups[0]) else 1
                sums[j] += g * min(1.0, cs[k] / (norms[i][k] + 1e-6))
        dp.optimizer.step()
        with torch.no_grad():
            for p, w in zip([p for g in groups for p in g], sums, strict=True):
                p.sub_(LR * w / qn)
        assert max_rel_error(list(model.parameters()), list(ref.parameters())) < 1e-12, step
        for k in (0, 1):
            b = (sum(n[k] <= cs[k] for n in norms) - len(y) / 2) / qn + 0.5
            cs[k] = cs[k] * math.exp(-0.5 * (b - 0.5))
    assert cs[0] > 0.3 and cs[1] < 2.0  # each moved towards its own median


def test_one_example_moves_the_released_pair_by_at_most_one_noise_unit():
    """max_j over (S/(σ_g C), count/σ_b) of ‖R(D) − R(D∖j)‖ ≤ 1/σ (σ = 0 runs, q = 1)."""
    sigma, count_noise, c = 1.0, 3.0, 0.05  # C far below the norms: every example clipped

    def released(drop: int | None) -> tuple[torch.Tensor, float]:
        full = _data(9)
        keep = [i for i in range(9) if i != drop]
        data = TensorDataset(*(t[keep] for t in full.tensors))
        model = _model()
        dp = _private(model, data, 0.0, c, swiftdp.AdaptiveClipping(count_noise=count_noise),
                      batch=len(data))
        x, y = next(iter(dp.data_loader))
        assert len(y) == len(data)  # q = 1
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(dp.model(x), y, reduction="sum").backward()
        dp.optimizer.step()
        s = torch.cat([(b - p.detach()).reshape(-1) for b, p in
                       zip(before, model.parameters(), strict=True)]) * len(data) / LR
        # the released count, from the threshold's move: C'/C = exp(−η(count/qN + ½ − γ))
        frac = -math.log(dp.privacy.max_grad_norm / c) / 0.2 + 0.5 - 0.5
        return s, frac * len(data)

    s_g = (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5
    full_s, full_count = released(None)
    moves = []
    for j in range(9):
        s_j, count_j = released(j)
        moves.append(math.hypot(float((full_s - s_j).norm()) / (s_g * c),
                                (full_count - count_j) / count_noise))
    assert max(moves) <= (1 / sigma) * (1 + 1e-9)
    assert max(moves) >= 0.99 / sigma


def test_noise_of_the_gradient_and_the_count_and_the_accounted_epsilon():
    sigma, count_noise = 1.2, 4.0
    data = _data(400)
    model = nn.Linear(4, 30).double()
    ada = swiftdp.AdaptiveClipping(target_quantile=0.5, learning_rate=0.2,
                                   count_noise=count_noise)
    dp = _private(model, data, sigma, 1.0, ada, batch=40, accountant="rdp")
    g_noise, c_noise = [], []
    for x, y in dp.data_loader:
        c = dp.privacy.max_grad_norm
        before = [p.detach().clone() for p in model.parameters()]
        dp.optimizer.zero_grad()
        if len(y):
            (dp.model(x[:, :4]).sum() * 0.0).backward()  # zero gradients: noise only
        dp.optimizer.step()
        delta = torch.cat([(b - p.detach()).reshape(-1) for b, p in
                           zip(before, model.parameters(), strict=True)])
        g_noise.extend((delta * 40 / LR / c).tolist())  # in units of C
        # every norm is 0 ≤ C: count = B/2 + noise; C'/C = exp(−η(count/qN + ½ − γ))
        released = (-math.log(dp.privacy.max_grad_norm / c) / 0.2 + 0.5 - 0.5) * 40
        c_noise.append(released - len(y) / 2)
    s_g = (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5
    assert dp.privacy.gradient_noise_multiplier() == pytest.approx(s_g, rel=1e-12)
    ratio = statistics.pstdev(g_noise) / s_g
    assert abs(ratio - 1) < 5 / math.sqrt(2 * len(g_noise)), ratio
    c_ratio = statistics.pstdev(c_noise) / count_noise
    assert abs(c_ratio - 1) < 0.45, c_ratio  # 10 draws
    # ε: one Gaussian of multiplier σ, as dp-accounting composes the two mechanisms
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
        0.1, dpa.ComposedDpEvent([dpa.GaussianDpEvent(s_g),
                                  dpa.GaussianDpEvent(2 * count_noise)])), dp.steps))
    assert dp.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_adaptive_misuse_is_refused():
    data, model = _data(), _model()
    with pytest.raises(InvalidArgumentError, match=r"count_noise=0\.1 is too small"):
        _private(model, data, 1.0, 1.0, swiftdp.AdaptiveClipping(count_noise=0.1))
    with pytest.raises(InvalidArgumentError, match="target_quantile"):
        _private(_model(), data, 1.0, 1.0, swiftdp.AdaptiveClipping(target_quantile=1.5))
    with pytest.raises(InvalidArgumentError, match="clipping='flat'"):
        _private(_model(), data, 1.0, 1.0, swiftdp.AdaptiveClipping(), clipping="automatic")
    dp = _private(_model(), data, 1.0, 1.0, swiftdp.AdaptiveClipping())
    assert dp.privacy.adaptive.count_noise == 1.0  # q·N/20 = 0.5 < σ·√K = 1: the floor
    with pytest.raises(InvalidArgumentError, match="adaptive clipping"):
        dp.set_max_grad_norm(2.0)


def test_a_threshold_changed_on_the_engine_only_is_refused():
    data = _data()
    model = _model()
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(data, batch_size=BATCH), max_grad_norm=1.0,
                              noise_multiplier=1.0, steps=4, seed=0)
    dp.clipper.set_max_grad_norm(10.0)  # the noise still says C = 1
    x, y = next(iter(dp.data_loader))
    with pytest.raises(StepStructureError, match=r"calibrated to 1\.0"):
        F.cross_entropy(dp.model(x), y).backward()
    # and between a backward and its step, dp.set_max_grad_norm is refused
    m2 = _model()
    dp2 = swiftdp.make_private(m2, torch.optim.SGD(m2.parameters(), lr=LR),
                               DataLoader(data, batch_size=BATCH), max_grad_norm=1.0,
                               noise_multiplier=1.0, steps=4, seed=0)
    for x, y in dp2.data_loader:
        if len(y):
            F.cross_entropy(dp2.model(x), y).backward()
            with pytest.raises(StepStructureError, match=r"between optimizer\.step"):
                dp2.set_max_grad_norm(10.0)
            break
        dp2.optimizer.step()


def test_adaptive_clipping_holds_for_every_sigma_of_a_noise_schedule():
    data = _data()
    rising = lambda t: 1.0 + t  # noqa: E731  (σ = 1, 2, 3, ...)
    # the default count noise is sized for the largest planned σ (here 8 steps: σ = 8)
    model = _model()
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                              DataLoader(data, batch_size=BATCH), max_grad_norm=1.0,
                              noise_schedule=rising, steps=8, seed=0, loss_reduction="sum",
                              adaptive_clipping=swiftdp.AdaptiveClipping())
    assert dp.privacy.adaptive.count_noise == pytest.approx(8.0)
    with pytest.raises(InvalidArgumentError, match="too large for adaptive"):
        dp.set_noise_multiplier(20.0)
    with pytest.raises(InvalidArgumentError, match="count_noise=2 is too small"):
        swiftdp.make_private(_model(), torch.optim.SGD(_model().parameters(), lr=LR),
                             DataLoader(data, batch_size=BATCH), max_grad_norm=1.0,
                             noise_schedule=rising, steps=8, seed=0,
                             adaptive_clipping=swiftdp.AdaptiveClipping(count_noise=2.0))


def test_an_extreme_learning_rate_moves_c_by_a_bounded_factor():
    data, model = _data(), _model()
    dp = _private(model, data, 1.0, 1.0,
                  swiftdp.AdaptiveClipping(target_quantile=0.5, learning_rate=1e6))
    for _, (x, y) in zip(range(3), dp.data_loader, strict=False):
        c = dp.privacy.max_grad_norm
        dp.optimizer.zero_grad()
        if len(y):
            F.cross_entropy(dp.model(x), y, reduction="sum").backward()
        dp.optimizer.step()  # no OverflowError, C never 0 or inf
        ratio = dp.privacy.max_grad_norm / c
        assert math.exp(-5) * (1 - 1e-12) <= ratio <= math.exp(5) * (1 + 1e-12)
