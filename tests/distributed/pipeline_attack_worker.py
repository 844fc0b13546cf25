"""Attacks on a two-stage pipeline under swiftdp, launched by ``torchrun`` from the tests.

Each attack is ordinary-looking loop code that would couple examples, desync
the stages' samples or share their noise; every one must be refused before a
step releases anything, on the stage where it happens (the other stage takes
part only as far as the attack needs, so no message is left in flight). The
run then measures, through ``make_private`` and the library's exchange,
``max_j ‖S(D) − S(D∖j)‖`` of both stages' clipped sums together (σ = 0,
q = 1: every example in the batch), against ``√(C_0² + C_1²)``.

Environment: ``OUT``, where rank 0 writes every rank's findings as JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.distributed import exit_process
from swiftdp.errors import SwiftDPError

N, BATCH, D_IN, D_MID, WIDTH = 20, 5, 5, 4, 6
C = [0.3, 0.2]


def _gather(obj: object) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def build() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    s0 = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, D_MID))
    s1 = nn.Sequential(nn.Linear(D_MID, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3))
    return s0.double(), s1.double()


def data(n: int = N, drop: int | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n, D_IN, dtype=torch.float64, generator=g) * 3.0
    ys = torch.randint(0, 3, (n,), generator=g)
    keep = [i for i in range(n) if i != drop]
    return TensorDataset(xs[keep], ys[keep])


def private(rank: int, dataset: TensorDataset | None = None, batch: int = BATCH,
            sigma: float = 0.0) -> tuple[nn.Module, Any]:
    s0, s1 = build()
    mine = s0 if rank == 0 else s1
    dp = swiftdp.make_private(mine, torch.optim.SGD(mine.parameters(), lr=1.0),
                              DataLoader(dataset or data(), batch_size=batch),
                              max_grad_norm=C, pipeline_stage=rank, noise_multiplier=sigma,
                              steps=4, seed=7, loss_reduction="sum", timeout=30)
    return mine, dp


def first_batch(dp: Any) -> tuple[Tensor, Tensor]:
    for x, y in dp.data_loader:
        if len(y):
            return x, y
        dp.optimizer.step()  # an empty batch: noise only (σ = 0 here)
    raise AssertionError("no non-empty batch")


def attempt(found: dict[str, str], name: str, rank: int,
            attack: Callable[[nn.Module, Any, Tensor, Tensor], None]) -> None:
    """Run ``attack`` on a fresh pair of stages; record its refusal, or that none came."""
    mine, dp = private(rank)
    x, y = first_batch(dp)
    before = [p.detach().clone() for p in mine.parameters()]
    try:
        attack(mine, dp, x, y)
        found[name] = "ACCEPTED"
    except SwiftDPError as e:
        found[name] = f"{type(e).__name__}: {e}"
    if any(not torch.equal(b, p) for b, p in zip(before, mine.parameters(), strict=True)):
        found[name] += " (BUT PARAMETERS CHANGED)"
    print(f"rank {rank} {name}: {found[name][:200]}", flush=True)
    dp.detach()
    dist.barrier()


def normal_last_stage(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
    F.cross_entropy(dp.model(dp.receive_activations()), y, reduction="sum").backward()
    dp.optimizer.step()


def attacks(rank: int) -> dict[str, str]:
    found: dict[str, str] = {}

    def inner_loss(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        # a loss of an inner activation, never through the stage's output
        if rank == 0:
            inner: list[Tensor] = []
            mine[0].register_forward_hook(lambda m, a, o: inner.append(o))
            dp.model(x)
            (inner[-1] - inner[-1].mean(0)).pow(2).sum().backward()  # (the last: the probe runs first)
            dp.optimizer.step()

    def function_of_output(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        if rank == 0:
            h = dp.model(x)
            dp.send_activations(h + h.mean(0, keepdim=True))  # couples the rows
            dp.stage_backward()

    def two_forwards(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        if rank == 0:
            h1 = dp.model(x)
            h2 = dp.model(x.flip(0))
            dp.send_activations(h1 + h2)

    def late_hook(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        if rank == 0:  # a forward hook added after make_private replaces the output
            mine.register_forward_hook(lambda m, a, o: o + o.mean(0, keepdim=True))
            dp.send_activations(dp.model(x))

    def in_place(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        if rank == 0:
            h = dp.model(x)
            with torch.no_grad():
                h.add_(h.mean(0, keepdim=True))
            dp.send_activations(h)

    def gradient_hook(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        # the exchange runs, but a hook on the output mixes the received gradient
        if rank == 0:
            h = dp.model(x)
            dp.send_activations(h)
            h.register_hook(lambda g: g + g.mean(0, keepdim=True))
            dp.stage_backward()
            dp.optimizer.step()
        else:
            F.cross_entropy(dp.model(dp.receive_activations()), y, reduction="sum").backward()

    def step_before_backward(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        if rank == 0:
            dp.send_activations(dp.model(x))
            try:
                dp.optimizer.step()
            finally:
                dp.stage_backward()  # drain the gradient; the next step is legitimate
        else:
            F.cross_entropy(dp.model(dp.receive_activations()), y, reduction="sum").backward()

    def sampler_on_one_stage(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        sampler = dp.data_loader.loader.poisson_sampler
        if rank == 1:  # rewind this stage's sampler: the stages' samples part
            state = sampler.state_dict(steps_consumed=0)
            sampler.load_state_dict(state)
        dp.optimizer.step()  # (noise only: the test needs no exchange)

    def copied_noise_state(mine: nn.Module, dp: Any, x: Tensor, y: Tensor) -> None:
        states = _gather(dp.optimizer.state_dict())
        if rank == 1:  # stage 0's optimizer state, noise stream included
            dp.optimizer.load_state_dict(states[0])
        dp.optimizer.step()

    for name, attack in [("inner loss", inner_loss), ("function of output", function_of_output),
                         ("two forwards", two_forwards), ("late forward hook", late_hook),
                         ("in-place change", in_place), ("gradient hook", gradient_hook),
                         ("step before stage_backward", step_before_backward),
                         ("sampler on one stage", sampler_on_one_stage),
                         ("copied noise state", copied_noise_state)]:
        attempt(found, name, rank, attack)
    return found


def debug_on_one_rank(rank: int) -> str:
    """SWIFTDP_DEBUG_DISTRIBUTED=1 on rank 1 only: refused by make_private on both ranks."""
    if rank == 1:
        os.environ["SWIFTDP_DEBUG_DISTRIBUTED"] = "1"
    try:
        _, dp = private(rank)
        dp.detach()
        return "ACCEPTED"
    except SwiftDPError as e:
        return str(e)
    finally:
        os.environ.pop("SWIFTDP_DEBUG_DISTRIBUTED", None)
        dist.barrier()


class Caching(nn.Module):
    """Stage 1's model, keeping a handle on its input (ordinary model code, e.g. for logging)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.last_input = x
        return self.inner(x)


def received_regulariser(rank: int) -> dict[str, Any]:
    """Last-stage terms on the received tensor, or on the model's own input through a hook or
    a cached handle: the gradient sent back is the model's own, so no update changes."""
    updates: dict[str, Tensor] = {}
    for attack in ("clean", "received", "late pre-hook", "cached input"):
        s0, s1 = build()
        mine = s0 if rank == 0 else Caching(s1)
        dp = swiftdp.make_private(mine, torch.optim.SGD(mine.parameters(), lr=1.0),
                                  DataLoader(data(), batch_size=BATCH), max_grad_norm=C,
                                  pipeline_stage=rank, noise_multiplier=0.0, steps=4, seed=7,
                                  loss_reduction="sum", timeout=30)
        x, y = first_batch(dp)
        before = [p.detach().clone() for p in mine.parameters()]
        if rank == 0:
            dp.send_activations(dp.model(x))
            dp.stage_backward()
        else:
            seen: list[Tensor] = []
            if attack == "late pre-hook":
                mine.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
            r = dp.receive_activations()
            loss = F.cross_entropy(dp.model(r), y, reduction="sum")
            handle = {"clean": None, "received": r.requires_grad_(),
                      "late pre-hook": seen[-1] if seen else None,
                      "cached input": mine.last_input}[attack]
            if handle is not None:
                loss = loss + 10.0 * (handle - handle.mean(0)).pow(2).sum()
            loss.backward()
        dp.optimizer.step()
        updates[attack] = torch.cat([(b - p.detach()).reshape(-1) for b, p in
                                     zip(before, mine.parameters(), strict=True)])
        dp.detach()
        dist.barrier()
    return {"difference": {k: float((updates["clean"] - u).abs().max())
                           for k, u in updates.items()},
            "size": float(updates["clean"].abs().max())}


def sensitivity(rank: int) -> dict[str, float]:
    """max_j ‖S(D) − S(D∖j)‖ of both stages' clipped sums, through make_private (σ = 0, q = 1)."""
    n = 7

    def clipped_sum(drop: int | None) -> Tensor:
        dataset = data(n, drop)
        mine, dp = private(rank, dataset, batch=len(dataset))  # q = 1: all of D in the batch
        before = [p.detach().clone() for p in mine.parameters()]
        x, y = next(iter(dp.data_loader))
        assert len(y) == len(dataset)
        if rank == 0:
            dp.send_activations(dp.model(x))
            dp.stage_backward()
        else:
            F.cross_entropy(dp.model(dp.receive_activations()), y, reduction="sum").backward()
        dp.optimizer.step()
        qn = dp.privacy.expected_batch_size
        own = torch.cat([(b - p).reshape(-1) for b, p in
                         zip(before, mine.parameters(), strict=True)]) * qn  # lr = 1
        dp.detach()
        return torch.cat(_gather(own))

    full = clipped_sum(None)
    moves = [float((full - clipped_sum(j)).norm()) for j in range(n)]
    return {"sensitivity": max(moves), "bound": math.hypot(*C)}


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = {"attacks": _gather(attacks(rank)), "debug": _gather(debug_on_one_rank(rank)),
           "regulariser": _gather(received_regulariser(rank)), "sensitivity": sensitivity(rank)}
    if rank == 0:
        with open(os.environ["OUT"], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    exit_process(0)  # (skips a gloo teardown abort of torch 2.13)


if __name__ == "__main__":
    main()
