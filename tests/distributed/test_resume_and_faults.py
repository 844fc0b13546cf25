"""Checkpoints and faults of a data-parallel run on gloo ranks (issue 10, must-haves 5 and 6).

References: the uninterrupted run (same seed) for resumed runs, and an
independent accountant for ε; for faults, the wall clock and the message.

* A 2-rank checkpoint resumes on 2 ranks bit for bit (every rank continues
  its own noise stream) and on 1 rank with the same Poisson sample (σ = 0:
  the same parameters up to the all-reduce's summation order) and a fresh
  noise stream, never one of the saved ones (which would replay noise).
* A rank that dies or hangs makes the other raise within the timeout, naming
  it; under torchrun's elastic restart the run resumes from its last
  checkpoint and ends with the ε of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.ranks import TORCHRUN, free_port
from swiftdp.accounting import PrivacyAccountant
from swiftdp.api.checkpoint import read as read_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")



def _env(out: Path, **extra: object) -> dict[str, str]:
    # Debug mode: every step checks the parameters are bitwise equal on all ranks.
    return {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out),
            "SWIFTDP_DEBUG_DISTRIBUTED": "1",
            **{k: str(v) for k, v in extra.items()}}


def _torchrun(tmp_path: Path, nproc: int, name: str, *flags: str,
              **extra: object) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), *flags, str(WORKER)],
        env=_env(out, **extra), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


def _epsilon(sigma: float, steps: int) -> float:
    acc = PrivacyAccountant("pld")
    acc.step(sigma, 10 / 40, steps)
    return acc.epsilon(1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The uninterrupted 2-rank run (6 steps) and the checkpoint of its first 3 steps."""
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = tmp / "run.ckpt"
    whole = _torchrun(tmp, 2, "whole", SIGMA=0.8, STEPS=6)
    first = _torchrun(tmp, 2, "first", SIGMA=0.8, STEPS=3, CKPT=ckpt, SAVE_EVERY=1)
    return {"tmp": tmp, "ckpt": ckpt, "whole": whole, "first": first}


def test_a_two_rank_checkpoint_resumes_on_two_ranks_bit_for_bit(runs):
    ckpt, whole = runs["ckpt"], runs["whole"]
    saved = read_checkpoint(ckpt)
    assert saved["world_size"] == 2 and len(saved["noise_generators"]) == 2
    assert not torch.equal(saved["noise_generators"][0], saved["noise_generators"][1])
    rest = _torchrun(runs["tmp"], 2, "rest", SIGMA=0.8, STEPS=6, CKPT=ckpt, RESUME=1)
    assert rest["resumed_at"] == 3 and rest["steps"] == 6 and rest["same_on_all_ranks"]
    assert rest["batches"] == whole["batches"][3:]  # the same Poisson sample
    assert rest["params"] == whole["params"]  # noise included: every stream continued
    assert rest["eps"] == pytest.approx(_epsilon(0.8, 6), rel=1e-9) == whole["eps"]


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_a_fresh_noise_stream(runs):
    ckpt, whole = runs["ckpt"], runs["whole"]
    saved = read_checkpoint(ckpt)["noise_generators"]
    one = _torchrun(runs["tmp"], 1, "one", SIGMA=0.8, STEPS=6, CKPT=ckpt, RESUME=1)
    assert one["resumed_at"] == 3 and one["steps"] == 6
    assert one["batches"] == whole["batches"][3:]  # the same sample, now on one rank
    assert one["eps"] == pytest.approx(_epsilon(0.8, 6), rel=1e-9)
    # A fresh stream, none of the saved ones: continuing one would replay its noise.
    mine = torch.tensor(one["noise_state"], dtype=torch.uint8)
    assert all(not torch.equal(mine, s) for s in saved)
    draws = [torch.randn(8, generator=torch.Generator().set_state(s)) for s in [mine, *saved]]
    assert all(not torch.allclose(draws[0], d) for d in draws[1:])
    assert one["params"] != whole["params"]


def test_physical_batching_per_rank_gives_the_same_run(runs):
    whole = runs["whole"]
    chunked = _torchrun(runs["tmp"], 2, "chunked", SIGMA=0.8, STEPS=6, PHYS=2)
    assert chunked["batches"] == whole["batches"] and chunked["same_on_all_ranks"]
    # The same noise streams; only the chunks' summation order differs.
    for a, b in zip(chunked["params"], whole["params"], strict=True):  # type: ignore[arg-type]
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-12, atol=1e-13)
    assert chunked["eps"] == whole["eps"]


def _plain_ranks(tmp_path: Path, name: str, timeout: float, **extra: object
                 ) -> tuple[list[subprocess.CompletedProcess[str] | None], float, Path]:
    """Two ranks as plain processes (no torchrun agent to kill the survivor)."""
    port, out = free_port(), tmp_path / f"{name}.json"
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER)], text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(out, RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, TIMEOUT=timeout, **extra)) for r in range(2)]
    start = time.monotonic()
    done: list[subprocess.CompletedProcess[str] | None] = [None, None]
    order = [1 - first, first] if (first := int(str(extra["VICTIM"]))) in (0, 1) else [0, 1]
    elapsed = 0.0
    for r in order:  # the survivor first: its exit time is what is bounded
        p = procs[r]
        try:
            stdout, stderr = p.communicate(timeout=90 if r == order[0] else 5)
            done[r] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        if r == order[0]:
            elapsed = time.monotonic() - start
    return done, elapsed, out


@pytest.mark.parametrize(("fault", "victim"), [("die", 1), ("hang", 1), ("die", 0)])
def test_a_rank_that_dies_or_hangs_is_named_by_the_other_within_the_timeout(
        tmp_path, fault, victim):
    survivor = 1 - victim
    done, elapsed, _ = _plain_ranks(tmp_path, fault, 4.0, SIGMA=0.5, STEPS=4, FAULT=fault,
                              VICTIM=victim, FAULT_AT=2)
    other = done[survivor]
    assert other is not None, "the surviving rank hung"
    assert other.returncode != 0
    assert f"rank {victim} did not reach optimizer.step() of logical step 2" in other.stderr
    assert "StepStructureError" in other.stderr
    assert elapsed < 60  # start-up (imports, two ranks) plus the 4 s timeout
    if fault == "die":
        assert done[victim] is not None and done[victim].returncode == 17


def test_a_checkpoint_saved_on_one_rank_only_is_refused_on_both_naming_the_calls(tmp_path):
    done, _, _ = _plain_ranks(tmp_path, "skip", 30.0, SIGMA=0.5, STEPS=4, FAULT="skip_save",
                              VICTIM=1, FAULT_AT=2, CKPT=tmp_path / "c.ckpt", SAVE_EVERY=1)
    for r, proc in enumerate(done):
        assert proc is not None and proc.returncode != 0, f"rank {r} did not fail"
        assert "reached different collective calls" in proc.stderr
        assert "rank 0: save_checkpoint after 2 steps; rank 1: optimizer.step()" in proc.stderr


def test_debug_mode_refuses_parameters_that_differ_between_ranks(tmp_path):
    done, _, _ = _plain_ranks(tmp_path, "tamper", 30.0, SIGMA=0.5, STEPS=4, FAULT="tamper",
                              VICTIM=1, FAULT_AT=2)
    for r, proc in enumerate(done):
        assert proc is not None and proc.returncode != 0, f"rank {r} did not fail"
        assert ("after optimizer.step() of logical step 2, rank 1's parameters differ"
                in proc.stderr)


def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, runs):
    ckpt, whole = tmp_path / "run.ckpt", runs["whole"]
    rest = _torchrun(tmp_path, 2, "elastic", "--max-restarts", "1", SIGMA=0.8, STEPS=6,
                     CKPT=ckpt, SAVE_EVERY=1, RESUME=1, FAULT="die", VICTIM=1, FAULT_AT=3,
                     TIMEOUT=10)
    assert rest["resumed_at"] == 3  # the last complete checkpoint, after 3 steps
    assert rest["steps"] == 6 and rest["same_on_all_ranks"]
    assert rest["params"] == whole["params"]  # nothing of the failed step was applied
    assert rest["eps"] == whole["eps"]
