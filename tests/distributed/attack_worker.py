"""One rank of a crafted data-parallel swiftdp run (tests/distributed/test_data_parallel_attacks.py).

Environment: ``SCENARIO`` (what rank 1 does differently), ``OUT`` (rank 0's JSON findings).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.distributed import exit_process

N, BATCH, C = 40, 10, 0.5


def _gather(obj: object) -> list[object]:
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write(obj: dict[str, object]) -> None:
    if dist.get_rank() == 0:  # whole or not at all (another rank waits for it)
        tmp = os.environ["OUT"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, os.environ["OUT"])


def _config_cases(rank: int) -> dict[str, dict[str, object]]:
    return {
        # σ calibrated to target ε for a different number of steps on each rank
        "target_steps": dict(noise_multiplier=None, target_epsilon=4.0,
                             steps=10 if rank == 0 else 1000, seed=7),
        # rank 0 seeded, rank 1 secure=True: rank 1's batch membership comes from seed=7
        "mixed_secure": dict(noise_multiplier=1.0, steps=30, seed=7 if rank == 0 else None,
                             secure=(rank == 1)),
    }


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("PG_TIMEOUT", "20"))))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    sc = os.environ["SCENARIO"]
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(0)
    din = 5
    if sc == "diff_arch":  # same numel per tensor, transposed shapes
        din = 4 if rank == 0 else 6
        model: nn.Module = nn.Linear(din, 24 // din, bias=False).double()
    else:
        model = nn.Sequential(nn.Linear(din, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    xs = torch.randn(N, din, dtype=torch.float64, generator=g)
    ys = torch.randint(0, 3, (N,), generator=g) % (3 if sc != "diff_arch" else 24 // din)
    if sc == "diff_data" and rank == 1:
        xs = xs + 100.0  # another dataset of the same length
    data = TensorDataset(xs, ys)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    kw: dict[str, object] = dict(max_grad_norm=C, noise_multiplier=1.0, steps=30, seed=7,
                                 loss_reduction="sum")
    if sc == "config":  # two make_private calls whose per-rank arguments differ unchecked
        found: dict[str, object] = {}
        for k, v in _config_cases(rank).items():
            m = nn.Linear(din, 3).double()
            try:
                d = swiftdp.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0),
                                         DataLoader(data, batch_size=BATCH), max_grad_norm=C,
                                         loss_reduction="sum", **v)
                found[k] = _gather([d.optimizer.noise_multiplier,
                                    type(d.optimizer.generator).__name__,
                                    d.data_loader.loader.poisson_sampler.seed])
            except Exception as e:
                found[k] = f"{type(e).__name__}: {e}"[:300]
        _write(found)
        dist.barrier()
        dist.destroy_process_group()
        exit_process(0)  # (skips a gloo teardown abort of torch 2.13)
    dp = swiftdp.make_private(model, opt, DataLoader(data, batch_size=BATCH), **kw)
    if sc == "sigma_one_rank" and rank == 1:
        dp.optimizer.set_noise_multiplier(0.0)
    if sc == "frozen_one_rank" and rank == 1:
        list(model.parameters())[-1].requires_grad_(False)
    noise: list[float] = []
    steps = 0
    t0 = time.monotonic()
    err = ""
    try:
        for i, (xb, yb) in zip(range(30 if sc == "sigma_one_rank" else 3), dp.data_loader,
                               strict=False):
            if sc == "skip_step" and rank == 1 and i == 1:
                continue  # e.g. `if not len(xb): continue`, or a bad batch skipped
            before = [p.detach().clone() for p in model.parameters()]
            dp.optimizer.zero_grad()
            if len(xb):
                out = dp.model(xb)
                loss = F.cross_entropy(out, yb, reduction="sum")
                (loss * 0.0 if sc == "sigma_one_rank" else loss).backward()
            dp.optimizer.step()
            steps += 1
            noise.extend(torch.cat([(b - p).reshape(-1) for b, p in
                                    zip(before, model.parameters(), strict=True)]).tolist())
    except Exception as e:
        err = f"{type(e).__name__}: {e}"[:400]
    elapsed = time.monotonic() - t0
    if rank == 0:  # write before any further collective (it may hang)
        _write({"err": err, "steps": steps, "elapsed": elapsed,
                "var_ratio": statistics.pvariance(noise) / (1.0 * C / BATCH) ** 2 if noise else None,
                "eps": dp.epsilon()})
    if sc == "skip_step":
        # The ranks no longer agree on the step (a collective may be left half done):
        # no teardown. A rank that left first could have torchrun stop rank 0 before it
        # wrote its verdict (gloo aborts at exit), so the others wait for the file.
        deadline = time.monotonic() + 60
        while rank != 0 and not os.path.exists(os.environ["OUT"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        exit_process(0)
    res = _gather({"err": err, "eps": dp.epsilon(), "sum": float(sum(
        p.detach().double().sum() for p in model.parameters()))})
    if rank == 0:
        prev = json.loads(open(os.environ["OUT"]).read())
        prev["ranks"] = res
        _write(prev)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    exit_process(0)  # (skips a gloo teardown abort of torch 2.13)


if __name__ == "__main__":
    main()
