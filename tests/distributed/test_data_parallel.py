"""Data-parallel ``make_private`` on two gloo ranks launched by ``torchrun`` (issue 10, part).

Against independent references: with σ = 0 the two ranks' update equals the
one-process clipped sum, example by example with plain autograd, over the
union of the ranks' batches, divided by the global expected batch size; the
ranks draw disjoint examples and end every step with bitwise identical
parameters (rank 1 starts from other weights: make_private copies rank 0's).
With σ > 0 the update's noise has variance (σC / qN)² per coordinate: one
share from each rank, not twice or half that; ε is the single-process ε for
the same (σ, q, steps) on both ranks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from support.ranks import TORCHRUN, free_port
from swiftdp.accounting import PrivacyAccountant

WORKER = Path(__file__).with_name("dp_worker.py")



def _run(tmp_path: Path, check: str, sigma: float, mode: str,
         **extra: str) -> dict[str, object]:
    out = tmp_path / f"{check}-{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHECK": check, "SIGMA": str(sigma),
           "MODE": mode, "OUT": str(out), **extra}
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(WORKER)],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_two_ranks_give_the_one_process_clipped_update(tmp_path, mode):
    r = _run(tmp_path, "exact", 0.0, mode)
    errors = r["errors"]
    assert isinstance(errors, list) and len(errors) == 3
    assert max(errors) < 1e-9
    assert r["expected_batch_size"] == 10.0  # q·N of the whole dataset, not per rank


def test_adaptive_clipping_on_two_ranks_follows_the_whole_samples_counts(tmp_path):
    """The ranks' counts are summed (with the noise shares) before the threshold moves."""
    r = _run(tmp_path, "exact", 0.0, "bk", ADAPTIVE="1")
    errors = r["errors"]
    assert isinstance(errors, list) and len(errors) == 6  # update and next C, per step
    assert max(errors) < 1e-9


def test_the_noise_is_added_once_in_total_and_epsilon_is_the_one_process_one(tmp_path):
    sigma, c, batch, n = 1.0, 0.5, 10, 40
    r = _run(tmp_path, "noise", sigma, "bk")
    noise = r["noise"]
    assert isinstance(noise, list) and len(noise) > 1000
    ratio = statistics.pvariance(noise) / (sigma * c / batch) ** 2
    assert 0.85 < ratio < 1.15  # 2 ranks each adding σ²C² would give 2, none 0
    acc = PrivacyAccountant("pld")
    acc.step(sigma, batch / n, 3)
    eps = r["eps"]
    assert isinstance(eps, list) and eps[0] == eps[1]
    assert eps[0] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)


def test_a_ddp_wrapped_model_is_refused_with_the_fix(tmp_path):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import swiftdp
    from swiftdp.errors import InvalidArgumentError

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        data = TensorDataset(torch.randn(8, 3), torch.zeros(8))
        with pytest.raises(InvalidArgumentError, match=r"ddp\.module"):
            swiftdp.make_private(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1),
                                 DataLoader(data, batch_size=2), max_grad_norm=1.0,
                                 noise_multiplier=1.0, steps=1)
    finally:
        dist.destroy_process_group()
