"""One rank of a data-parallel run that checkpoints, resumes or fails, launched from the tests.

Environment:
    OUT: where rank 0 writes its findings (JSON).
    SIGMA, STEPS: noise multiplier and total logical steps of the run.
    SECURE: ``1`` for ``secure=True``.
    CKPT: the checkpoint file; SAVE_EVERY=1 saves after every step.
    RESUME: ``1`` loads CKPT first when it exists.
    FAULT: ``die`` or ``hang`` on rank VICTIM before its step FAULT_AT, or
        ``skip_save``: rank VICTIM does not save after step FAULT_AT, or
        ``tamper``: rank VICTIM changes a weight before step FAULT_AT
        (die/hang on the first attempt only, under torchrun's elastic restarts).
    TIMEOUT: make_private(timeout=) in seconds.
    PHYS: max_physical_batch_size (each rank chunks its own share).
Launched by torchrun (any number of processes) or as plain processes with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (then no agent kills the
survivors, so their own error is what the test sees).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
import swiftdp.distributed
from swiftdp.distributed import exit_process

N, BATCH, C, LR = 40, 10, 0.5, 0.5


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        swiftdp.distributed.init_process_group("gloo", timeout=60)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    env = os.environ
    sigma, steps = float(env["SIGMA"]), int(env["STEPS"])
    ckpt = Path(env["CKPT"]) if env.get("CKPT") else None
    first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(N, dtype=torch.float64)[:, None]  # carried along to name the examples
    data = TensorDataset(torch.cat([torch.randn(N, 5, dtype=torch.float64, generator=g), ids], 1),
                         torch.randint(0, 3, (N,), generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    dp = swiftdp.make_private(model, opt, DataLoader(data, batch_size=BATCH), max_grad_norm=C,
                              noise_multiplier=sigma, steps=steps, seed=7,
                              secure=env.get("SECURE") == "1", loss_reduction="sum",
                              timeout=float(env.get("TIMEOUT", "60")),
                              max_physical_batch_size=int(env["PHYS"]) if env.get("PHYS") else None)
    found: dict[str, object] = {}
    if env.get("RESUME") == "1" and ckpt is not None and ckpt.exists():
        dp.load_checkpoint(ckpt)
        found["resumed_at"] = dp.steps
        found["noise_state"] = dp.optimizer.generator.get_state().tolist() if not (
            env.get("SECURE") == "1") else None
    batches: list[list[int]] = []
    current: list[int] = []
    while dp.steps < steps:
        for xb, yb in dp.data_loader:
            if dp.steps >= steps:
                break
            if (env.get("FAULT") in ("die", "hang") and first_attempt and rank == int(env["VICTIM"])
                    and dp.steps == int(env["FAULT_AT"])):
                if env["FAULT"] == "die":
                    os._exit(17)
                time.sleep(600)
            if (env.get("FAULT") == "tamper" and rank == int(env["VICTIM"])
                    and dp.steps == int(env["FAULT_AT"])):
                with torch.no_grad():  # a rank's own change outside optimizer.step()
                    next(model.parameters()).view(-1)[0] += 1e-9
            if len(xb):
                F.cross_entropy(dp.model(xb[:, :-1]), yb, reduction="sum").backward()
            before = dp.steps
            dp.optimizer.step()  # mid logical batch (physical chunks): deferred
            current.extend(xb[:, -1].long().tolist())
            if dp.steps == before:
                continue
            dp.optimizer.zero_grad()
            mine, current = current, []
            if world > 1:  # after the logical step: every rank has its own number of chunks
                parts: list[object] = [None] * world
                dist.all_gather_object(parts, mine)
                mine = [i for part in parts for i in part]  # type: ignore[attr-defined]
            batches.append(sorted(mine))
            skip = (env.get("FAULT") == "skip_save" and rank == int(env["VICTIM"])
                    and dp.steps == int(env["FAULT_AT"]))  # `if rank == 0: save` habits
            if ckpt is not None and env.get("SAVE_EVERY") == "1" and not skip:
                dp.save_checkpoint(ckpt, extra={"rank": rank})
    found.update(batches=batches, params=[p.detach().reshape(-1).tolist() for p in model.parameters()],
                 eps=dp.epsilon(), steps=dp.steps, world=world)
    if world > 1:
        everyone: list[object] = [None] * world
        dist.all_gather_object(everyone, found["params"])
        found["same_on_all_ranks"] = all(p == everyone[0] for p in everyone)
        dist.barrier()
    if rank == 0:
        Path(env["OUT"]).write_text(json.dumps(found))
    if world > 1:
        dist.destroy_process_group()
        exit_process(0)  # (skips a gloo teardown abort of torch 2.13)


if __name__ == "__main__":
    sys.exit(main())
