"""Adversarial checks of data-parallel make_private (two gloo ranks under torchrun).

Each launch runs tests/distributed/attack_worker.py with a ``SCENARIO`` in which
rank 1 does something different from rank 0 that ordinary user code can do.
The xfail(strict) tests document what currently goes through silently (figures
measured at 3fa25f1); they turn into passes once the library refuses it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from support.ranks import TORCHRUN, free_port

WORKER = Path(__file__).with_name("attack_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"



def _run(tmp_path: Path, scenario: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / f"{scenario}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCENARIO": scenario, "OUT": str(out),
           "PG_TIMEOUT": "20",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(WORKER)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    text = proc.stdout[-4000:] + proc.stderr[-4000:]
    result: dict[str, object] = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, text, result


def _refused(rc: int, text: str) -> bool:
    return rc != 0 and "InvalidArgumentError" in text


# fixed (was, measured before the fix: rank 1 set_noise_multiplier(0): total noise variance ratio
# 0.52 (half), rank 0 still reports eps=4.21 for sigma=1, rank 1 eps=inf; no error)
def test_sigma_changed_on_one_rank_is_refused_or_harmless(tmp_path):
    rc, text, r = _run(tmp_path, "sigma_one_rank")
    err = str(r.get("err") or "")
    if rc != 0 or err:  # refused (the worker records the error it caught)
        said = (text + err).lower()
        assert "noise" in said and "disagree" in said, said
        return
    ratio = r["var_ratio"]
    assert isinstance(ratio, float) and 0.8 < ratio < 1.2, ratio
    ranks = r["ranks"]
    assert isinstance(ranks, list) and ranks[0]["eps"] == ranks[1]["eps"]


# fixed (was, measured before the fix: per-rank arguments not compared: target_epsilon with
# steps=10 vs 1000 gives sigma 1.275 vs 8.619 (effective sigma 6.16 < 8.62 that rank 1 accounts);
# secure=True on rank 1 only: rank 1's batches come from rank 0's public seed=7 (sampler.seed == 7
# on the secure rank))
def test_per_rank_arguments_that_decide_the_noise_must_agree(tmp_path):
    rc, text, r = _run(tmp_path, "config")
    assert rc == 0, text
    steps = r["target_steps"]
    assert isinstance(steps, str) and "disagree" in steps, steps
    mixed = r["mixed_secure"]
    assert isinstance(mixed, str) and "disagree" in mixed, mixed


# fixed (was, measured before the fix: rank 1 passes another dataset of the same length (x + 100):
# trains silently, identical parameters and eps on both ranks)
def test_different_data_on_the_ranks_is_refused(tmp_path):
    rc, text, _ = _run(tmp_path, "diff_data")
    assert _refused(rc, text), text


# fixed (was, measured before the fix: rank 0 Linear(4, 6) vs rank 1 Linear(6, 4), no bias (same
# numel, transposed shapes): broadcast and all-reduce succeed, rank 1's weight is rank 0's
# flattened buffer reshaped; no error)
def test_different_architectures_on_the_ranks_are_refused(tmp_path):
    rc, text, _ = _run(tmp_path, "diff_arch")
    assert _refused(rc, text), text


# fixed (was, measured before the fix: rank 1 skips one batch (`continue`): its steps pair with
# rank 0's other batches unchecked; rank 1 exits rc 0 after 2 steps, rank 0 gets 1 of 3 steps then
# gloo 'Connection closed by peer', no swiftdp error; with a live peer it waits for the pg timeout
# (default 30 min))
def test_ranks_stepping_different_batches_get_a_swiftdp_error(tmp_path):
    _rc, text, r = _run(tmp_path, "skip_step")
    err = r.get("err", "")
    assert isinstance(err, str) and "StepStructureError" in err, (err, text[-1500:])


def test_effective_noise_of_the_measured_sigma_mismatch():
    # The figure in the second test's reason: shares N(0, σ_r²C²/2) sum to σ_eff².
    s0, s1 = 1.2754697423836712, 8.619124869729488
    assert math.sqrt((s0 ** 2 + s1 ** 2) / 2) == pytest.approx(6.16, abs=0.01)
