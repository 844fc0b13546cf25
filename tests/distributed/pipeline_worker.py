"""One stage of a two-stage pipeline under swiftdp, launched by ``torchrun`` from the tests.

Rank 0 holds the first part of the model, rank 1 the rest; activations go
forward and their gradient comes back with ``dist.send`` / ``dist.recv``.

Environment: ``CHECK`` — ``exact`` (σ = 0, against the reference, for two
choices of the stages' modes and loss reduction, then the neighbour
sensitivity) or ``noise`` (σ = 1, then the refusals of misconfigured
stages) — and ``OUT``, where rank 0 writes its findings as JSON. One launch
does several runs in the same process group (a torchrun start costs ~15 s here).
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.distributed import exit_process
from swiftdp.errors import InvalidArgumentError, StepStructureError

N, BATCH, LR, STEPS, D_IN, D_MID = 40, 10, 1.0, 3, 5, 4
C = [0.3, 0.2]


def _gather(obj: object) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def build(width: int) -> tuple[nn.Module, nn.Module]:
    """Both stages of the whole model, the same on every rank (one seed)."""
    torch.manual_seed(0)
    s0 = nn.Sequential(nn.Linear(D_IN, width), nn.Tanh(), nn.Linear(width, D_MID), nn.Tanh())
    s1 = nn.Sequential(nn.Linear(D_MID, width), nn.Tanh(), nn.Linear(width, 3))
    return s0.double(), s1.double()


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(N, D_IN, dtype=torch.float64, generator=g)
    ys = torch.randint(0, 3, (N,), generator=g)
    ids = torch.arange(N, dtype=torch.float64)[:, None]  # carried along to name the examples
    return TensorDataset(torch.cat([xs, ids], 1), ys)


def pipeline_pass(model: nn.Module, rank: int, x: Tensor, y: Tensor, reduction: str,
                  zero: bool = False, dp: Any = None) -> None:
    """The forward and backward of one batch through both stages (this rank's part).

    With ``dp``, swiftdp carries the activations and their gradient
    (``dp.send_activations`` / ``dp.stage_backward`` / ``dp.receive_activations``);
    without, a bare :class:`GradClipper` on each stage and the exchange by hand.
    """
    if dp is not None:
        if rank == 0:
            dp.send_activations(dp.model(x))
            dp.stage_backward()  # the next stage's activation gradient, not a loss
        else:
            loss = F.cross_entropy(dp.model(dp.receive_activations()), y, reduction=reduction)
            (loss * 0.0 if zero else loss).backward()  # the gradient goes back by itself
        return
    if rank == 0:
        h = model(x)
        dist.send(h.detach().contiguous(), 1)
        g = torch.empty_like(h)
        dist.recv(g, 1)
        h.backward(g)
    else:
        h = torch.empty(len(y), D_MID, dtype=torch.float64)
        dist.recv(h, 0)
        h.requires_grad_()
        loss = F.cross_entropy(model(h), y, reduction=reduction)
        (loss * 0.0 if zero else loss).backward()
        assert h.grad is not None
        dist.send(h.grad.contiguous(), 0)  # unclipped: stage 0 clips its own part


def group_reference(s0: nn.Module, s1: nn.Module, x: Tensor, y: Tensor,
                    limits: list[float]) -> list[Tensor]:
    """Σ_i of example i's whole-model gradient, stage k's part clipped to C_k (plain autograd)."""
    parts = [list(s0.parameters()), list(s1.parameters())]
    sums = [torch.zeros_like(p) for part in parts for p in part]
    for i in range(len(x)):
        loss = F.cross_entropy(s1(s0(x[i:i + 1])), y[i:i + 1])
        grads = torch.autograd.grad(loss, [p for part in parts for p in part])
        split = [grads[:len(parts[0])], grads[len(parts[0]):]]
        factors = []
        for k, gs in enumerate(split):
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
            factors.append(min(1.0, limits[k] / (norm + 1e-6)))
        for j, g in enumerate(grads):
            sums[j].add_(g, alpha=factors[0 if j < len(parts[0]) else 1])
    return sums


def _train(rank: int, sigma: float, modes: list[str], reduction: str, width: int,
           check: str) -> dict[str, Any]:
    s0, s1 = build(width)
    mine = s0 if rank == 0 else s1
    opt = torch.optim.SGD(mine.parameters(), lr=LR)
    dp = swiftdp.make_private(mine, opt, DataLoader(data(), batch_size=BATCH), max_grad_norm=C,
                              pipeline_stage=rank, noise_multiplier=sigma, steps=STEPS, seed=7,
                              mode=modes[rank], loss_reduction=reduction, timeout=30)
    q_n = dp.optimizer.settings.expected_batch_size
    errors, batches, noise = [], [], []
    for _, (xb, yb) in zip(range(STEPS), dp.data_loader, strict=False):
        before = [[p.detach().clone() for p in s] for s in _gather(list(mine.parameters()))]
        ids = xb[:, -1].long().tolist()
        batches.append(_gather(ids))
        dp.optimizer.zero_grad()
        if len(yb):
            pipeline_pass(dp.model, rank, xb[:, :-1], yb, reduction, zero=check == "noise", dp=dp)
        dp.optimizer.step()
        after = [[p.detach().clone() for p in s] for s in _gather(list(mine.parameters()))]
        flat_before = [p for s in before for p in s]
        flat_after = [p for s in after for p in s]
        if check == "exact" and rank == 0:
            ref0, ref1 = build(width)
            for m, vals in ((ref0, before[0]), (ref1, before[1])):
                with torch.no_grad():
                    for p, v in zip(m.parameters(), vals, strict=True):
                        p.copy_(v)
            xs, ys = data().tensors
            want = group_reference(ref0, ref1, xs[ids, :-1], ys[ids], C)
            worst = 0.0  # (each example's own loss, whatever the batch reduction)
            for b, a, w in zip(flat_before, flat_after, want, strict=True):
                exp = b - LR * w / q_n
                worst = max(worst, float((a - exp).abs().max()) / max(float(exp.abs().max()), 1e-12))
            errors.append(worst)
        if check == "noise":
            per_stage = [torch.cat([(b - a).reshape(-1) for b, a in zip(sb, sa, strict=True)]) / LR
                         for sb, sa in zip(before, after, strict=True)]
            noise.append([t.tolist() for t in per_stage])
    eps = _gather(dp.epsilon())
    dp.detach()
    return {"errors": errors, "batches": batches, "noise": noise, "eps": eps,
            "expected_batch_size": q_n, "steps": dp.steps,
            "sigma": dp.privacy.noise_multiplier, "sensitivity": dp.privacy.sensitivity()}


def _sensitivity(rank: int, reduction: str) -> dict[str, float]:
    """max_j ‖S(D) − S(D∖j)‖ of both stages' clipped sums together, engine level, noise off."""
    s0, s1 = build(6)
    mine = s0 if rank == 0 else s1
    limits = [2e-3, 1e-3]  # far below every group's norm: every example clipped in both
    clipper = swiftdp.GradClipper(mine, limits[rank], loss_reduction=reduction,  # type: ignore[arg-type]
                                  check_loss=rank == 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, D_IN, dtype=torch.float64, generator=g) * 2.0
    y = torch.randint(0, 3, (7,), generator=g)

    def clipped(keep: list[int]) -> Tensor:
        for p in mine.parameters():
            p.grad = None
        pipeline_pass(mine, rank, x[keep], y[keep], reduction)
        own = torch.cat([p.grad.reshape(-1) for p in mine.parameters()])  # type: ignore[union-attr]
        return torch.cat(_gather(own))

    full = clipped(list(range(7)))
    moves = [float((full - clipped([i for i in range(7) if i != j])).norm()) for j in range(7)]
    clipper.remove()
    return {"sensitivity": max(moves), "bound": math.hypot(*limits)}


def _refusals(rank: int) -> dict[str, str]:
    """Each misconfiguration refused on both stages together (the group stays usable)."""
    found: dict[str, str] = {}

    def attempt(name: str, dataset: TensorDataset | None = None, **kw: Any) -> None:
        s0, s1 = build(4)
        mine = s0 if rank == 0 else s1
        args: dict[str, Any] = {"max_grad_norm": C, "pipeline_stage": rank,
                                "noise_multiplier": 1.0, "steps": STEPS, "seed": 7,
                                "timeout": 30, **kw}
        try:
            swiftdp.make_private(mine, torch.optim.SGD(mine.parameters(), lr=LR),
                                 DataLoader(dataset or data(), batch_size=BATCH), **args)
        except InvalidArgumentError as e:
            found[name] = str(e)
        else:
            found[name] = "ACCEPTED"

    attempt("sigma", noise_multiplier=1.0 + rank)
    attempt("thresholds", max_grad_norm=[0.3, 0.2 + 0.1 * rank])
    attempt("ghost on the receiving stage", mode="ghost" if rank == 1 else "bk")
    attempt("nanobatch on the receiving stage", mode="nanobatch" if rank == 1 else "bk")
    attempt("stage taken twice", pipeline_stage=0)
    attempt("a stage beside a data-parallel rank", pipeline_stage=rank if rank else None,
            max_grad_norm=C if rank else C[0])
    attempt("three thresholds on two ranks", max_grad_norm=[0.3, 0.2, 0.1])
    attempt("reduction", loss_reduction="sum" if rank else "mean")
    attempt("steps", steps=STEPS + rank)
    attempt("seeding", seed=None if rank else 7)
    other = data()
    if rank == 1:
        other.tensors[0][0, 0] += 1.0  # one value of one example differs
    attempt("dataset", dataset=other)
    # σ changed on one stage only, then a step: refused on both before any noise
    s0, s1 = build(4)
    mine = s0 if rank == 0 else s1
    dp = swiftdp.make_private(mine, torch.optim.SGD(mine.parameters(), lr=LR),
                              DataLoader(data(), batch_size=BATCH), max_grad_norm=C,
                              pipeline_stage=rank, noise_multiplier=1.0, steps=STEPS, seed=7,
                              timeout=30)
    if rank == 1:
        dp.set_noise_multiplier(0.5)
    xb, yb = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    if len(yb):
        pipeline_pass(dp.model, rank, xb[:, :-1], yb, "mean", dp=dp)
    before = [p.detach().clone() for p in mine.parameters()]
    try:
        dp.optimizer.step()
        found["set_noise_multiplier on one stage"] = "ACCEPTED"
    except StepStructureError as e:
        found["set_noise_multiplier on one stage"] = str(e)
    if any(not torch.equal(b, p) for b, p in zip(before, mine.parameters(), strict=True)):
        found["set_noise_multiplier on one stage"] += " (BUT PARAMETERS CHANGED)"
    return found


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    if os.environ["CHECK"] == "exact":
        for modes, reduction in ((["bk", "bk"], "mean"), (["ghost", "per_sample"], "sum")):
            out[f"{','.join(modes)}/{reduction}"] = _train(rank, 0.0, modes, reduction, 6, "exact")
        out["sensitivity"] = _sensitivity(rank, "mean")
    else:
        out["noise"] = _train(rank, 1.0, ["bk", "bk"], "mean", 40, "noise")
        out["refusals"] = _gather(_refusals(rank))
    if rank == 0:
        with open(os.environ["OUT"], "w") as f:
            json.dump(out, f)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    exit_process(0)  # (skips a gloo teardown abort of torch 2.13)


if __name__ == "__main__":
    main()
