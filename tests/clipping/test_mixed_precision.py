"""Mixed precision: bf16 autocast around the forward, and bf16 parameters, in every mode.

Contracts: under ``torch.autocast`` the engine clips what the autocast forward
computed, with norms, clip factors and clipped sums in float32 or wider (a
backward called inside the autocast region included); the neighbour
sensitivity stays ``≤ C``; ``make_private`` trains; a ``GradScaler`` is refused.

Tolerances. bf16 keeps 8 significant bits (unit roundoff ``u = 2⁻⁸ ≈ 3.9e-3``);
the forward's matmuls and the output gradients are rounded to it, the
engine's own arithmetic is not. Measured on the models below (5 seeds, CPU,
torch 2.13, ``C`` the median norm): per-example norms within ``6.7e-3``
(``≈ 1.7 u``) of the float64 one-example-at-a-time reference, and
``‖S_bf16 − S_fp32‖ ≤ 1.0e-2 · Σ_i ‖c_i g_i‖`` (up to ``2.0e-2 · ‖S_fp32‖``:
the CNN's clipped sum cancels, so its own norm is a poor scale). The tests
allow about 3x that: :data:`NORM_TOL`, :data:`SUM_TOL`. With every example
clipped and a summed loss the sensitivity measured ``≤ C`` in every mode and
model; :data:`SLACK` is the float32 allowance of the other privacy tests. A
mean loss does not keep it with 16-bit output gradients (its ``1/B`` is
rounded into every example's bf16 gradient): it is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from support.oracle import reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.clipping.step import BackwardResult
from swiftdp.errors import InvalidArgumentError

MODES = ("bk", "ghost", "per_sample", "nanobatch")
NORM_TOL = 2e-2
SUM_TOL = 3e-2
SLACK = 1.0 + 1e-5
BF16 = torch.bfloat16
B = 6


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=2)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.depthwise(F.relu(self.norm(self.conv(x)))).flatten(1))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.norm(self.embed(x))).mean(1))


class _LSTM(nn.Module):
    # The Linear hands the LSTM a bf16 input under autocast: torch's own CPU LSTM
    # fails under bf16 autocast on a float32 input (a oneDNN error, without swiftdp too).
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.proj(self.embed(x)))[0][:, -1])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp": (_mlp, lambda b: torch.randn(b, 10)),
    "cnn": (_CNN, lambda b: torch.randn(b, 3, 8, 8)),
    "transformer": (_Transformer, lambda b: torch.randint(0, 20, (b, 7))),
    "lstm": (_LSTM, lambda b: torch.randint(0, 20, (b, 7))),
}


def _setup(name: str, seed: int = 0, batch: int = B) -> tuple[nn.Module, Tensor, Tensor]:
    make, inputs = MODELS[name]
    torch.manual_seed(seed)
    return make(), inputs(batch), torch.randint(0, 5, (batch,))


def _clipped_sum(model: nn.Module, x: Tensor, y: Tensor, mode: str, c: float, *,
                 autocast: bool, reduction: str = "sum", backward_inside: bool = False,
                 clipper: swiftdp.GradClipper | None = None) -> tuple[Tensor, Tensor]:
    """swiftdp's clipped sum (flattened, float64) and the per-example norms it reported.

    A new clipper (removed after) unless ``clipper`` is given.
    """
    for p in model.parameters():
        p.grad = None
    own = clipper is None
    eng = swiftdp.GradClipper(model, c, mode=mode, loss_reduction=reduction) if own else clipper
    assert eng is not None
    try:
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = F.cross_entropy(model(x), y, reduction=reduction)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    finally:
        if own:
            eng.remove()
    assert eng.last_norms is not None
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double(), eng.last_norms


@functools.cache
def _reference_norms(name: str, batch: int = B) -> Tensor:
    """Per-example gradient norms of :func:`_setup`'s model and batch, float64, one at a time."""
    model, x, y = _setup(name, batch=batch)
    x64 = x.double() if x.is_floating_point() else x
    _, norms = reference_clipped_sum(model.double(),
                                     lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                     x64, y, 1e9)
    return norms


# ------------------------------------------------------------ autocast accuracy
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_autocast_clipped_sum_matches_float32_and_norms_match_float64_reference(name, mode):
    model, x, y = _setup(name)
    ref = _reference_norms(name)
    c = float(ref.median())  # about half the examples clipped
    s32, _ = _clipped_sum(model, x, y, mode, c, autocast=False)
    s16, norms = _clipped_sum(model, x, y, mode, c, autocast=True)
    assert norms.dtype in (torch.float32, torch.float64)
    rel = ((norms.double() - ref).abs() / ref).max().item()
    assert rel <= NORM_TOL, f"{name}/{mode}: per-example norms off by {rel:.2e} (relative)"
    scale = ref.clamp(max=c).sum().item()  # Σ_i ‖c_i g_i‖: the sum without cancellation
    err = (s16 - s32).norm().item() / scale
    assert torch.isfinite(s16).all() and err <= SUM_TOL, f"{name}/{mode}: clipped sum off by {err:.2e}"


class _Tokens(nn.Module):
    """Linear layers on (B, T, d) sequences: the ghost norm's Gram matrices are used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_backward_inside_autocast_keeps_the_engine_arithmetic_out_of_bf16(mode):
    # A backward called inside the autocast region must not turn the engine's
    # float32 Gram matrices, instantiations and clipped sums into bf16 ones
    # (they moved the norms by ~2e-2 before): the results equal those of a
    # backward outside it.
    torch.manual_seed(1)
    model, x, y = _Tokens(), torch.randn(B, 8, 32), torch.randint(0, 5, (B,))
    out_s, out_n = _clipped_sum(model, x, y, mode, 1e6, autocast=True)
    in_s, in_n = _clipped_sum(model, x, y, mode, 1e6, autocast=True, backward_inside=True)
    torch.testing.assert_close(in_n.double(), out_n.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(in_s, out_s, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------ privacy
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_sensitivity_under_autocast_with_every_example_clipped_is_at_most_c(name, mode):
    model, x, y = _setup(name, batch=5)
    c = 1e-2 * float(_reference_norms(name, 5).min())
    clipper = swiftdp.GradClipper(model, c, mode=mode, loss_reduction="sum")
    seen: list[Tensor] = []

    def clipped(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        s, norms = _clipped_sum(model, *batch, mode, c, autocast=True, reduction="sum",
                                clipper=clipper)
        seen.append(norms)
        return [s]

    sens = neighbour_sensitivity(clipped, (x, y), x.shape[0])
    clipper.remove()
    assert bool((seen[0] > c).all()), "every example must be clipped"
    assert sens <= c * SLACK, f"{name}/{mode}: sensitivity {sens / c:.7f} C"


def test_a_mean_loss_with_16_bit_output_gradients_is_refused():
    """Its 1/B would be rounded into every example's bf16 gradient: B-dependent rounding.

    Measured before the refusal (MLP, every example clipped): sensitivity 1.0055 C at
    B = 96, 1.025 C at B = 1536; a summed loss stays <= C (the tests above).
    """
    torch.manual_seed(0)
    model, x, y = _mlp(), torch.randn(96, 10), torch.randint(0, 5, (96,))
    with pytest.raises(InvalidArgumentError, match=r"loss_reduction='sum'"):
        _clipped_sum(model, x, y, "bk", 1e-4, autocast=True, reduction="mean")
    with pytest.raises(InvalidArgumentError, match=r"torch\.bfloat16"):
        _clipped_sum(model.to(BF16), x.to(BF16), y, "bk", 1e-4, autocast=False,
                     reduction="mean")


# ------------------------------------------------------------ bf16 parameters
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_bf16_parameters_give_float32_clipped_sums_and_norms(name, mode):
    model, x, y = _setup(name)
    model = model.to(BF16)
    if x.is_floating_point():
        x = x.to(BF16)
    results: list[BackwardResult] = []
    clipper = swiftdp.GradClipper(model, 1.0, mode=mode, sink=results.append,
                                  loss_reduction="sum")  # (a mean is refused in bf16)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    clipper.remove()
    assert len(results) == 1
    for p, s in results[0].sums:
        assert s.dtype == torch.float32 and s.shape == p.shape and torch.isfinite(s).all()
    assert clipper.last_norms is not None and clipper.last_norms.dtype in (torch.float32,
                                                                           torch.float64)
    assert bool(torch.isfinite(clipper.last_norms).all())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_sensitivity_of_bf16_parameters_clipped_sums_is_at_most_c(name, mode):
    # What make_private noises: the float32 sums handed to the sink (measured
    # 0.9922 C: the bound keeps room for a cast to bf16, which the sink never does).
    model, x, y = _setup(name, batch=5)
    model = model.to(BF16)
    c = 1e-2 * float(_reference_norms(name, 5).min())
    results: list[BackwardResult] = []
    clipper = swiftdp.GradClipper(model, c, mode=mode, loss_reduction="sum",
                                  sink=results.append)

    def clipped(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        results.clear()
        F.cross_entropy(model(batch[0]), batch[1], reduction="sum").backward()
        return [s for _, s in results[0].sums]

    sens = neighbour_sensitivity(clipped, (x.to(BF16) if x.is_floating_point() else x, y), 5)
    clipper.remove()
    assert sens <= c * SLACK, f"{name}/{mode}: sensitivity {sens / c:.7f} C"


def _train(mode: str, *, autocast: bool = False, dtype: torch.dtype = torch.float32,
           sigma: float = 0.0, steps: int = 3) -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = _mlp().to(dtype)
    ds = TensorDataset(torch.randn(64, 10).to(dtype), torch.randint(0, 5, (64,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=16), noise_multiplier=sigma,
                              max_grad_norm=1.0, seed=3, delta=1e-5, mode=mode,
                              accountant="rdp", loss_reduction="sum")
    updates: list[Tensor] = []
    for i, (x, y) in enumerate(dp.data_loader):
        if i == steps:
            break
        dp.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = F.cross_entropy(dp.model(x), y, reduction="sum")
        loss.backward()
        dp.optimizer.step()
        updates.extend(p.grad for p in model.parameters())
    return model, updates


@pytest.mark.parametrize("mode", MODES)
def test_make_private_trains_bf16_parameters_with_a_finite_bf16_noised_update(mode):
    torch.manual_seed(0)
    before = [p.detach().clone() for p in _mlp().to(BF16).parameters()]  # _train's start
    model, updates = _train(mode, dtype=BF16, sigma=1.0)
    assert updates and all(u is not None and u.dtype == BF16 and torch.isfinite(u).all()
                           for u in updates)
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert p.dtype == BF16 and torch.isfinite(p).all() and not torch.equal(p, p0)


@pytest.mark.parametrize("mode", MODES)
def test_make_private_under_autocast_follows_the_float32_run(mode):
    # σ = 0 and the same seed (same Poisson batches): only bf16 rounding differs.
    # Measured: 5.6e-4 of each parameter's largest entry after 3 steps.
    ref, _ = _train(mode)
    got, _ = _train(mode, autocast=True)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        assert b.dtype == torch.float32
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err <= 1e-2, f"{mode}: parameters off by {err:.2e}"


# ------------------------------------------------------------ loss scaling
def test_grad_scaler_is_refused_with_a_clear_error():
    model, x, y = _setup("mlp")
    clipper = swiftdp.GradClipper(model, 1.0)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=BF16):
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(InvalidArgumentError, match=r"GradScaler.*bf16 autocast"):
        scaler.scale(loss)
    clipper.remove()


def test_grad_scaler_is_refused_under_make_private_before_any_gradient_flows():
    torch.manual_seed(0)
    model = _mlp()
    ds = TensorDataset(torch.randn(64, 10), torch.randint(0, 5, (64,)))
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(ds, batch_size=16), noise_multiplier=1.0,
                              max_grad_norm=1.0, seed=0, delta=1e-5)
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(iter(dp.data_loader))
    with torch.autocast("cpu", dtype=BF16):
        loss = F.cross_entropy(dp.model(x), y)
    with pytest.raises(InvalidArgumentError, match="GradScaler"):
        scaler.scale(loss).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fp16 autocast and GradScaler need a CUDA device (none here)")
@pytest.mark.parametrize("mode", MODES)
def test_fp16_autocast_on_cuda_matches_float32_and_grad_scaler_is_refused(mode):
    model, x, y = _setup("cnn")
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    sums = {}
    for fp16 in (False, True):
        for p in model.parameters():
            p.grad = None
        clipper = swiftdp.GradClipper(model, 1.0, mode=mode)
        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        clipper.remove()
        sums[fp16] = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    # Σ_i ‖c_i g_i‖ <= B C with C = 1; fp16 keeps 11 bits, bf16's tolerance covers it
    assert (sums[True] - sums[False]).norm() <= SUM_TOL * B
    clipper = swiftdp.GradClipper(model, 1.0, mode=mode)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(InvalidArgumentError, match="GradScaler"):
        torch.amp.GradScaler("cuda").scale(loss)
    clipper.remove()
