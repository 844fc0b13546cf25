"""One rank of a data-parallel swiftdp run, launched by ``torchrun`` from the tests.

Environment: ``SIGMA`` (noise multiplier), ``MODE`` (engine mode), ``OUT``
(where rank 0 writes its findings as JSON), ``CHECK`` (``exact`` or ``noise``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import swiftdp
import swiftdp.distributed
from support.oracle import max_rel_error, reference_clipped_sum
from swiftdp.distributed import exit_process

N, BATCH, C, LR, STEPS = 40, 10, 0.5, 1.0, 3


def _gather(obj: object) -> list[object]:
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    # Tiny buckets: every layer's noisy sum is its own asynchronous all-reduce.
    swiftdp.distributed.BUCKET_BYTES = 64
    torch.set_num_threads(1)
    rank = dist.get_rank()
    check, sigma, mode = os.environ["CHECK"], float(os.environ["SIGMA"]), os.environ["MODE"]
    torch.manual_seed(100 + rank)  # different on each rank: make_private copies rank 0's
    width = 40 if check == "noise" else 4

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).double()

    model = build()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(N, 5, dtype=torch.float64, generator=g)
    ys = torch.randint(0, 3, (N,), generator=g)
    ids = torch.arange(N, dtype=torch.float64)[:, None]  # carried along to name the examples
    data = TensorDataset(torch.cat([xs, ids], 1), ys)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    adaptive = os.environ.get("ADAPTIVE") == "1"  # thresholds that follow the norms' median
    dp = swiftdp.make_private(model, opt, DataLoader(data, batch_size=BATCH), max_grad_norm=C,
                              noise_multiplier=sigma, steps=STEPS, seed=7, mode=mode,
                              loss_reduction="sum",
                              adaptive_clipping=swiftdp.AdaptiveClipping(0.5, 0.3)
                              if adaptive else None)
    c_now = C  # the threshold of this step, tracked by the test (one process, whole sample)
    q_n = dp.optimizer.settings.expected_batch_size
    errors, sizes, noise = [], [], []
    for _, (xb, yb) in zip(range(STEPS), dp.data_loader, strict=False):
        before = build()  # a plain copy (the private model carries the engine's hooks)
        before.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        mine = xb[:, -1].long().tolist()
        dp.optimizer.zero_grad()
        if len(xb):
            out = dp.model(xb[:, :-1])
            loss = F.cross_entropy(out, yb, reduction="sum")
            (loss * 0.0 if check == "noise" else loss).backward()
        dp.optimizer.step()
        union = sorted(i for part in _gather(mine) for i in part)  # type: ignore[union-attr]
        sizes.append(len(union))
        if check == "exact":
            want, norms = reference_clipped_sum(before, lambda o, t: F.cross_entropy(o, t),
                                                xs[union], ys[union], c_now)
            expected = [p - LR * w / q_n for p, w in zip(before.parameters(), want, strict=True)]
            errors.append(max_rel_error(list(model.parameters()), expected))
            if adaptive:  # C ← C·exp(−η(b − γ)), b = Σ_i (1[‖g_i‖ ≤ C] − ½)/qN + ½ (σ = 0)
                b = (float((norms <= c_now).sum()) - len(union) / 2) / q_n + 0.5
                c_now = c_now * math.exp(-0.3 * (b - 0.5))
                errors.append(abs(dp.privacy.max_grad_norm - c_now) / c_now)
        else:
            delta = torch.cat([(b - p).reshape(-1) for b, p in
                               zip(before.parameters(), model.parameters(), strict=True)])
            noise.extend((delta / LR).tolist())
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        same = _gather([p.detach().clone() for p in model.parameters()])
        if not all(torch.equal(a, b) for r in same for a, b in  # type: ignore[union-attr]
                   zip(r, model.parameters(), strict=True)):
            raise AssertionError(f"rank {rank}: parameters differ between ranks ({checksum})")
        disjoint = _gather(mine)
        flat = [i for part in disjoint for i in part]  # type: ignore[union-attr]
        if len(flat) != len(set(flat)):
            raise AssertionError("two ranks drew the same example")
    eps = _gather(dp.epsilon())
    if rank == 0:
        with open(os.environ["OUT"], "w") as f:
            json.dump({"errors": errors, "sizes": sizes, "eps": eps, "noise": noise,
                       "expected_batch_size": q_n}, f)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    exit_process(0)  # (skips a gloo teardown abort of torch 2.13)


if __name__ == "__main__":
    main()
