"""Group-wise clipping inside the backward pass (bk, per_sample): each group clipped when complete.

With per-layer thresholds a group's norm needs only its own layers, so the
engine clips it as soon as its last use has its output gradient and frees its
per-example state (clipping/early.py). Held to: the same clipped sums as the
independent per-group reference (float64) and as clipping everything at the
end; later layers' groups really are clipped before the backward reaches the
first layer; a checkpointed group waits for its recomputation; the noise and
the adaptive counts read the same norms; a threshold changed mid-backward is
refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_group_clipping import CASES, group_reference
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import swiftdp
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import UnsupportedModuleError

MODES = ("bk", "per_sample")


def _sums(model: nn.Module, xs: Tensor, ys: Tensor, groups: dict[str, float], mode: str,
          in_backward: bool) -> tuple[list[Tensor], Tensor]:
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(model, groups, mode=mode, loss_reduction="sum")  # type: ignore[arg-type]
    clipper.clip_groups_in_backward = in_backward
    try:
        F.cross_entropy(model(xs), ys, reduction="sum").backward()
    finally:
        clipper.remove()
    assert clipper.last_norms is not None
    return ([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
             if p.requires_grad], clipper.last_norms)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_in_backward_group_clipping_matches_the_reference_and_the_end_of_backward_clipping(
        case, mode):
    build, data, names = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = data(torch.Generator().manual_seed(1))
    groups = dict.fromkeys(names, 0.05)
    early, norms_early = _sums(model, xs, ys, groups, mode, True)
    late, norms_late = _sums(model, xs, ys, {**groups}, mode, False)
    ref, ref_norms = group_reference(model, xs, ys, groups)
    for a, b, r in zip(early, late, ref, strict=True):
        scale = float(r.norm()) + 1e-12
        assert float((a - r).norm()) / scale < 1e-10
        assert float((a - b).norm()) / scale < 1e-12
    torch.testing.assert_close(norms_early, norms_late, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(norms_early, ref_norms, rtol=1e-9, atol=1e-12)


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.middle = nn.Linear(6, 6)
        self.last = nn.Linear(6, 3)
        self.seen: list[set[int]] = []
        self.clipper: swiftdp.GradClipper | None = None
        self.recompute = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        if h.requires_grad:  # when the backward reaches the first layer, record what is clipped
            h.register_hook(self._record)
        if self.recompute:
            h = checkpoint(lambda t: torch.tanh(self.middle(t)), h, use_reentrant=True)
        else:
            h = torch.tanh(self.middle(h))
        return self.last(h)

    def _record(self, grad: Tensor) -> None:
        step = self.clipper.current_step if self.clipper is not None else None
        early = getattr(step, "early", None)
        self.seen.append(set(early.clipped) if early is not None else set())


GROUPS = {"first": 0.1, "middle": 0.1, "last": 0.1}


def test_later_groups_are_clipped_before_the_backward_reaches_the_first_layer():
    torch.manual_seed(0)
    model = Deep().double()
    model.clipper = swiftdp.GradClipper(model, GROUPS, loss_reduction="sum")
    xs = torch.randn(4, 5, dtype=torch.float64)
    F.cross_entropy(model(xs), torch.tensor([0, 1, 2, 0]), reduction="sum").backward()
    assert model.seen == [{1, 2}]  # middle and last clipped; the first not yet complete


def test_a_group_inside_a_reentrant_checkpoint_waits_for_its_recomputation():
    torch.manual_seed(0)
    model = Deep().double()
    model.recompute = True
    xs, ys = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    got, _ = _sums(model, xs, ys, GROUPS, "bk", True)
    model.recompute = False
    ref, _ = group_reference(model, xs, ys, GROUPS)
    for a, r in zip(got, ref, strict=True):
        assert float((a - r).norm()) <= 1e-10 * (float(r.norm()) + 1e-12)


def test_sensitivity_is_at_most_the_root_sum_of_squares_with_in_backward_clipping():
    torch.manual_seed(3)
    model = CASES["conv"][0]().double()
    xs, ys = CASES["conv"][1](torch.Generator().manual_seed(5))
    xs = xs * 40.0
    groups = swiftdp.per_layer_thresholds(model, 0.02)
    bound = 0.02

    def run(batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return _sums(model, batch[0], batch[1], groups, "bk", True)[0]

    sens = neighbour_sensitivity(run, (xs, ys), len(xs))
    assert 0.9 * bound <= sens <= bound * (1 + 1e-9)


def test_a_threshold_changed_between_two_groups_is_refused():
    torch.manual_seed(0)
    model = Deep().double()
    clipper = swiftdp.GradClipper(model, dict(GROUPS), loss_reduction="sum")
    xs = torch.randn(4, 5, dtype=torch.float64)

    def change(grad: Tensor) -> None:  # after the last groups were clipped, before the first
        clipper.set_max_grad_norm({"first": 0.5, "middle": 0.1, "last": 0.1})

    def on_middle(module: nn.Module, args: object, out: Tensor) -> None:
        out.register_hook(change)

    hook = model.middle.register_forward_hook(on_middle)
    try:
        out = model(xs)
        with pytest.raises(UnsupportedModuleError, match="thresholds changed during the backward"):
            F.cross_entropy(out, torch.tensor([0, 1, 2, 0]), reduction="sum").backward()
    finally:
        hook.remove()


def test_make_private_with_per_layer_groups_steps_and_counts_examples_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    xs, ys = torch.randn(64, 5), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    dp = swiftdp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                              max_grad_norm=swiftdp.per_layer_thresholds(model, 1.0),
                              noise_multiplier=1.0, steps=4, seed=0,
                              adaptive_clipping=swiftdp.AdaptiveClipping(target_quantile=0.5))
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        F.cross_entropy(dp.model(x), y).backward()
        dp.optimizer.step()
    assert dp.steps == len(dp.data_loader)
    assert dp.clipper.last_norms is not None and dp.clipper.last_norms.shape[0] == 2
