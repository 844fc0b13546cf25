"""Augmentation multiplicity: the K views of an example are clipped as that one example.

De et al. (2022) average the gradients of K augmented views before clipping.
The engine takes ``(B, K, ...)`` inputs, runs the model on ``(B·K, ...)`` and
must clip each example's *sum over its views*, exactly (float64 against a
one-example-at-a-time reference whose example is its K views), in every mode
and layer family (row-wise layers, convolutions, group and instance norms);
removing one example moves the clipped sum by at most C (not K·C); and a
model or loss that mixes the views of different examples is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swiftdp
from support.oracle import reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import ExampleMixingError, InvalidArgumentError

MODES = ("bk", "ghost", "per_sample", "nanobatch")
K, B = 3, 5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, stride=2), nn.InstanceNorm2d(4, affine=True), nn.Tanh(),
        nn.Conv2d(4, 4, 1, groups=4), nn.Flatten(), nn.Linear(4 * 2 * 2, 4),
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.GroupNorm(1, 4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4, 4))


def _wrn() -> nn.Module:  # De et al.'s architecture, at its smallest depth and width
    from swiftdp.models import WideResNetGN
    return WideResNetGN((2, 8, 8), 4, depth=10, width=1)


CASES = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (2, 5, 5)), "conv1d": (_conv1d, (2, 8)),
         "wrn": (_wrn, (2, 8, 8))}


def _data(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, K, *shape, generator=g, dtype=torch.float64) * scale
    return xs, torch.randint(0, 4, (B,), generator=g)


def _view_loss(out: Tensor, y: Tensor) -> Tensor:
    """One example's loss: the mean over its K views (the reference's unit)."""
    return F.cross_entropy(out, y.repeat_interleave(K))


def _engine_sum(model: nn.Module, xs: Tensor, ys: Tensor, c: float, mode: str,
                clipping: str = "flat", augmult: int = K) -> list[Tensor]:
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(model, c, mode=mode, clipping=clipping,  # type: ignore[arg-type]
                                  augmult=augmult)
    try:
        out = model(xs)
        n = xs.shape[0]
        assert out.shape[:2] == ((n, K) if augmult > 1 else (n, 4))
        labels = ys[:, None].expand(n, K) if augmult > 1 else ys
        F.cross_entropy(out.flatten(0, 1) if augmult > 1 else out, labels.flatten()).backward()
    finally:
        clipper.remove()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _reference(model: nn.Module, xs: Tensor, ys: Tensor, c: float, clipping: str = "flat"
               ) -> list[Tensor]:
    sums, _ = reference_clipped_sum(model, _view_loss, xs, ys, c, clipping=clipping,
                                    call=lambda m, x: m(x.flatten(0, 1)))
    return sums


def _max_error(got: list[Tensor], ref: list[Tensor]) -> float:
    """Largest error over the parameters, relative to the whole clipped sum's norm."""
    total = torch.sqrt(sum(((r.double() ** 2).sum() for r in ref), torch.zeros((), dtype=torch.float64)))
    return max(float((g - r).norm() / total) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_views_clipped_as_one_example_match_the_one_example_reference(case, mode):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = _data(shape)
    c = 0.05  # below most examples' norms: clipping is active
    got = _engine_sum(model, xs, ys, c, mode)
    assert _max_error(got, _reference(model, xs, ys, c)) < 1e-10


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_automatic_clipping_of_views_matches_the_reference(mode):
    torch.manual_seed(1)
    model = _cnn().double()
    xs, ys = _data((2, 5, 5), seed=1)
    got = _engine_sum(model, xs, ys, 0.1, mode, clipping="automatic")
    assert _max_error(got, _reference(model, xs, ys, 0.1, clipping="automatic")) < 1e-10


@pytest.mark.parametrize("mode", ["bk", "ghost", "nanobatch"])
def test_removing_one_example_moves_the_sum_by_at_most_c_not_k_c(mode):
    torch.manual_seed(2)
    model = _cnn().double()
    xs, ys = _data((2, 5, 5), seed=2, scale=20.0)  # every example far above C
    ys = torch.zeros_like(ys)  # one label: the views' gradients point alike
    c = 0.01

    def run(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return _engine_sum(model, batch[0], batch[1], c, mode)

    sens = neighbour_sensitivity(run, (xs, ys), B)
    assert c * 0.99 <= sens <= c * (1 + 1e-9)

    # The test has the power to see the bug it guards against: each view clipped
    # as an example of its own lets one example move the sum by up to K·C.
    def per_view(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        x, y = batch
        return _engine_sum(model, x.flatten(0, 1), y.repeat_interleave(K), c, mode, augmult=1)

    assert neighbour_sensitivity(per_view, (xs, ys), B) > 1.5 * c


class _RollRows(nn.Module):
    """Shifts the merged rows by one: a view of each example reaches the next example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.roll(1, 0))


class _ViewStatistic(nn.Module):
    """Normalises by a statistic over all B·K rows: every example reaches every other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x - x.mean(0, keepdim=True))


def _private(model: nn.Module, **kw: object) -> swiftdp.PrivateTraining:
    xs = torch.randn(64, 6)
    ys = torch.randint(0, 4, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return swiftdp.make_private(model, opt, loader, max_grad_norm=1.0, noise_multiplier=1.0,
                                steps=4, augmult=K, seed=0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", [_RollRows, _ViewStatistic])
def test_a_model_mixing_the_views_of_different_examples_is_refused(model):
    dp = _private(model(), augment=lambda x: x + 0.1 * torch.randn_like(x))
    x, y = next(iter(dp.data_loader))
    assert x.shape[1:] == (K, 6) and y.shape[1:] == (K,)
    with pytest.raises(ExampleMixingError):
        dp.model(x)


def test_a_loss_coupling_the_views_of_different_examples_is_refused():
    dp = _private(nn.Linear(6, 4))
    x, y = next(iter(dp.data_loader))
    out = dp.model(x)  # (B, K, 4)
    loss = F.cross_entropy(out.flatten(0, 1), y.flatten()) + (out[:, 0] * out.roll(1, 0)[:, 1]).sum()
    with pytest.raises(ExampleMixingError):
        loss.backward()


def test_a_training_forward_without_the_views_dimension_is_refused_naming_the_argument():
    dp = _private(nn.Linear(6, 4))
    x, _ = next(iter(dp.data_loader))
    with pytest.raises(InvalidArgumentError, match=r"argument #0 has shape .*\(B, 3, \.\.\.\)"):
        dp.model(x[:, 0])  # (B, 6): one view only


def test_views_stacked_view_major_are_refused_by_the_batch_size_check():
    dp = _private(nn.Linear(6, 4))
    x, y = next(iter(dp.data_loader))
    assert x.shape[0] != K
    wrong = x.transpose(0, 1).contiguous()  # (K, B, 6): view-major, as torch.stack(dim=0) makes
    with pytest.raises((swiftdp.errors.StepStructureError, InvalidArgumentError)):
        out = dp.model(wrong)
        F.cross_entropy(out.flatten(0, 1), y.t().flatten()).backward()


def test_evaluation_without_gradient_takes_plain_batches():
    model = nn.Linear(6, 4)
    dp = _private(model)
    with torch.no_grad():
        assert dp.model(torch.randn(7, 6)).shape == (7, 4)


def test_a_training_run_with_views_and_physical_chunks_equals_the_whole_batch_run():
    """σ = 0: chunks of the views give the same update as the whole logical batch."""
    def run(chunk: int | None) -> list[Tensor]:
        torch.manual_seed(0)
        model = _cnn().double()
        xs = torch.randn(48, 2, 5, 5, dtype=torch.float64)
        ys = torch.randint(0, 4, (48,))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=12)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        dp = swiftdp.make_private(
            model, opt, loader, max_grad_norm=0.05, noise_multiplier=0.0, steps=2, augmult=K,
            augment=lambda x: x.flip(-1), seed=3, max_physical_batch_size=chunk)
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            out = dp.model(x)
            F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
            dp.optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    whole, chunked = run(None), run(4)
    assert max(float((a - b).abs().max()) for a, b in zip(whole, chunked, strict=True)) < 1e-12


def test_the_noise_is_calibrated_to_c_whatever_k():
    """σ·C per coordinate, not σ·K·C: the sensitivity the noise reads is the example's."""
    torch.manual_seed(5)
    model = nn.Linear(6, 500).double()
    before = [p.detach().clone() for p in model.parameters()]
    xs = torch.randn(64, 6, dtype=torch.float64)
    ys = torch.randint(0, 500, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                              max_grad_norm=0.5, noise_multiplier=2.0, steps=4, augmult=K,
                              augment=lambda x: x * 1.5, seed=0)
    assert dp.privacy.sensitivity() == pytest.approx(0.5)
    x, y = next(iter(dp.data_loader))
    out = dp.model(x)
    F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    dp.optimizer.step()
    ref = _reference_with(before, x, y, 0.5)
    noise = torch.cat([((b - p.detach()) * 16.0 - r).flatten()
                       for b, p, r in zip(before, model.parameters(), ref, strict=True)])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.06)


def _reference_with(params: list[Tensor], x: Tensor, y: Tensor, c: float) -> list[Tensor]:
    model = nn.Linear(6, 500).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(v)
    return _reference(model, x, y[:, 0], c)


def test_augmult_is_checked():
    with pytest.raises(InvalidArgumentError, match="augmult"):
        swiftdp.GradClipper(nn.Linear(2, 2), 1.0, augmult=0)
    with pytest.raises(InvalidArgumentError, match="batch_first"):
        swiftdp.GradClipper(nn.Linear(2, 2), 1.0, augmult=2, batch_first=False)
