"""One-run auditing of the real pipeline: quiet on the correct one, loud on each known bug.

The audited configuration (``CFG``): 1,000 gradient canaries and 1,000
fillers, one full-batch step (q = 1) at σ = 2, C = 1: the accountant claims
ε = 1.99 at δ = 1e-5, and the audit's ceiling (every guess right) is above 5,
so a bug that raises the true ε well past the claim is visible. The correct
pipeline's bound stays below the claim on every seed; clipping disabled,
noise × 0.3, noise drawn per physical chunk (10 chunks: × 0.32) and σ
lowered without telling the accountant each push it above. Sampling at 2q
needs a million canaries (one step at q = 0.5, σ = 3: claimed 0.781; the
correct pipeline 0.44–0.49, sampling at 2q 0.82–0.87 over seeds 1–3); dividing
by the realised batch size leaks a count no single canary can be blamed for:
tests/audit/test_many_runs.py catches it across independent runs.
"""

from __future__ import annotations

import json

import pytest

from swiftdp.audit import faults, one_run
from swiftdp.cli.main import main

CFG = {"canaries": 1000, "fillers": 1000, "steps": 1, "sample_rate": 1.0,
       "noise_multiplier": 2.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_correct_pipeline_stays_below_the_claimed_epsilon(seed):
    r = one_run(seed=seed, **CFG)
    assert r.epsilon_claimed == pytest.approx(1.993, abs=0.01)
    assert r.ceiling_fdp > r.epsilon_claimed  # the audit has the power to see a violation
    assert not r.violated
    assert r.epsilon_lower_bound_fdp < r.epsilon_claimed
    assert r.canaries == len(r.in_scores) + len(r.out_scores) == 1000


@pytest.mark.parametrize(("fault", "extra"), [
    (faults.clipping_disabled, {}),
    (lambda: faults.noise_scaled(0.3), {}),
    (faults.noise_per_physical_batch, {"max_physical_batch_size": 200}),
    (lambda: faults.sigma_unreported(0.3), {}),
])
def test_each_known_bug_pushes_the_bound_above_the_claim(fault, extra):
    with fault():
        r = one_run(seed=1, **CFG, **extra)
    assert r.violated, (r.epsilon_lower_bound, r.epsilon_lower_bound_fdp, r.epsilon_claimed)


def test_a_multi_step_subsampled_run_is_audited_below_its_claim():
    r = one_run(seed=3, canaries=500, fillers=500, steps=5, sample_rate=0.5,
                noise_multiplier=1.0)
    assert not r.violated and r.steps == 5


def test_the_faults_leave_the_pipeline_as_it_was():
    with faults.noise_scaled(0.0):
        pass
    r = one_run(seed=0, **CFG)
    assert not r.violated


def test_the_cli_prints_writes_and_exits_by_the_verdict(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", "--seed", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "claimed ε" in text and "consistent" in text
    doc = json.loads((out / "audit.json").read_text())
    assert doc["violated"] is False and doc["canaries"] == 1000
    assert (out / "audit.png").stat().st_size > 1000
    assert main(["audit", "--seed", "0", "--fault", "noise:0.3"]) == 1
    assert "VIOLATED" in capsys.readouterr().out


def test_a_bad_fault_is_refused(capsys):
    assert main(["audit", "--fault", "noise:-1"]) == 2
    assert "FACTOR must be a number > 0" in capsys.readouterr().err


def test_sampling_at_twice_the_accounted_rate_is_caught_with_a_million_canaries():
    cfg = {"canaries": 1_000_000, "fillers": 0, "steps": 1, "sample_rate": 0.5,
           "noise_multiplier": 3.0}
    correct = one_run(seed=2, **cfg)
    with faults.sampling_rate_scaled(2.0):
        faulty = one_run(seed=2, **cfg)
    assert correct.epsilon_claimed == pytest.approx(0.781, abs=0.01)
    assert not correct.violated and faulty.violated
