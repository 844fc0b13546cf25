"""Per-device clipping on a two-stage pipeline: two gloo ranks launched by ``torchrun``.

Rank 0 holds the first part of the model, rank 1 the rest
(:mod:`swiftdp.pipeline`). Against independent references: with σ = 0 the
two stages' update equals, float64, the one-example-at-a-time reference of
the whole model with stage 0's parameters clipped to C_0 and stage 1's to
C_1 (example by example with plain autograd), divided by q·N; both stages
draw the same Poisson sample (not split as in data parallelism); removing
one example moves both stages' clipped sums together by at most
√(C_0² + C_1²), and by nearly that for large gradients. With σ > 0 each
stage's update carries noise of std σ·√(C_0² + C_1²) / qN per coordinate,
independent between the stages, and both report the ε of one Gaussian
mechanism with (σ, q, steps). Misconfigured stages are refused on both.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from support.ranks import TORCHRUN, free_port
from swiftdp.accounting import PrivacyAccountant

WORKER = Path(__file__).with_name("pipeline_worker.py")
C0, C1, N, BATCH = 0.3, 0.2, 40, 10



def _run(tmp_path: Path, check: str, **env: str) -> dict[str, Any]:
    out = tmp_path / f"{check}.json"
    full = {**os.environ, "OMP_NUM_THREADS": "1", "CHECK": check, "OUT": str(out), **env}
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(WORKER)],
        env=full, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_two_stages_give_the_whole_models_group_clipped_update(tmp_path):
    r = _run(tmp_path, "exact")
    for config in ("bk,bk/mean", "ghost,per_sample/sum"):  # stage 0's modes, the reduction
        run = r[config]
        errors = run["errors"]
        assert len(errors) == 3 and max(errors) <= 1e-10, (config, errors)
        # the same Poisson sample on both stages, the whole of it (not split by rank)
        batches = run["batches"]
        assert all(b[0] == b[1] for b in batches), config
        assert sum(len(b[0]) for b in batches) > 0
        assert run["expected_batch_size"] == BATCH
        assert run["eps"][0] == run["eps"][1]
    # max_j ‖S(D) − S(D∖j)‖ over both stages' clipped sums: at most √(C_0² + C_1²), and
    # reached when every example is clipped on both stages
    sens = r["sensitivity"]
    assert sens["sensitivity"] <= sens["bound"] * (1 + 1e-9)
    assert sens["sensitivity"] >= 0.99 * sens["bound"]


def test_each_stage_adds_the_whole_noise_independently_and_misconfigured_stages_are_refused(
        tmp_path):
    r = _run(tmp_path, "noise")
    noise = r["noise"]
    sigma, s = noise["sigma"], math.hypot(C0, C1)
    assert noise["sensitivity"] == pytest.approx(s, rel=1e-15)
    want = sigma * s / BATCH
    steps = noise["noise"]
    for stage in (0, 1):
        values = [v for step in steps for v in step[stage]]
        assert len(values) > 400
        ratio = statistics.pstdev(values) / want
        # σ·C_k alone would give 0.83 or 0.55; σ·S/√2 (a data-parallel share) 0.71
        assert abs(ratio - 1) < 5 / math.sqrt(2 * len(values)), (stage, ratio)
    for step in steps:  # two generators: the stages' noise is uncorrelated
        a, b = step[0], step[1]
        n = min(len(a), len(b))
        assert abs(statistics.correlation(a[:n], b[:n])) < 5 / math.sqrt(n)
    acc = PrivacyAccountant("pld")
    acc.step(sigma, BATCH / N, noise["steps"])
    assert noise["eps"][0] == noise["eps"][1]
    assert noise["eps"][0] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)

    expected = {
        "sigma": "disagree on",
        "thresholds": "disagree on",
        "ghost on the receiving stage": "mode='ghost'",
        "nanobatch on the receiving stage": "mode='nanobatch'",
        "stage taken twice": "pipeline_stage=[0, 0]",
        "a stage beside a data-parallel rank": "pipeline_stage=[None, 1]",
        "three thresholds on two ranks": "lists 3 stages",
        "reduction": "loss_reduction",
        "steps": "planned steps",
        "seeding": "seeded",
        "dataset": "dataset (fingerprint)",
        "set_noise_multiplier on one stage": "noise multiplier",
    }
    for rank, found in enumerate(r["refusals"]):
        for name, text in expected.items():
            assert name in found, (rank, name)
            assert "ACCEPTED" not in found[name] and "CHANGED" not in found[name], (rank, name)
            assert text in found[name], (rank, name, found[name])
