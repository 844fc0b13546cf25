"""Many independent runs, one canary each: the audit for a leak of a count.

Dividing the noised sum by the realised batch size reveals the realised size
in the update's scale; one run's canaries cannot each be blamed for a count,
so one run does not see it (tests/audit/test_one_run.py). Here each of 200
runs holds one filler and one canary slot at q = 1 (the divisor B = 2 in
both worlds, as accounted), σ = 2 (claimed ε = 1.99 at δ = 1e-5), and 1,000
parameters no example touches: their spread is σC/B in a correct run
whatever the canary, σC/(1 + x) with the bug. The correct pipeline's guesses
are at chance; the bug's are all right.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from swiftdp.audit import faults, many_runs
from swiftdp.cli.main import main
from swiftdp.errors import InvalidArgumentError


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_correct_pipeline_is_not_flagged_by_either_score(seed):
    for score in ("scale", "direction"):
        r = many_runs(seed=seed, score=score)
        assert r.epsilon_claimed == pytest.approx(1.993, abs=0.01)
        assert r.ceiling_fdp > r.epsilon_claimed
        assert not r.violated, (score, r.epsilon_lower_bound_fdp)
        assert r.runs == r.canaries == len(r.in_scores) + len(r.out_scores) == 200


def test_dividing_by_the_realised_batch_is_caught():
    with faults.realised_batch_division():
        r = many_runs(seed=1)
    assert r.violated and r.epsilon_lower_bound_fdp > r.epsilon_claimed
    # Every included run's divisor is 2 and every excluded one's 1: the scores separate.
    assert min(r.in_scores) - max(r.out_scores) == pytest.approx(np.log(2), abs=0.2)


def test_the_correct_scale_score_carries_nothing_about_the_canary():
    r = many_runs(seed=4, runs=400)
    gap = np.mean(r.in_scores) - np.mean(r.out_scores)
    spread = np.std(r.in_scores + r.out_scores)
    assert abs(gap) < 4 * spread * np.sqrt(1 / len(r.in_scores) + 1 / len(r.out_scores))


def test_unclipped_canaries_are_caught_by_the_direction_score():
    with faults.clipping_disabled():
        r = many_runs(seed=0, score="direction")
    assert r.violated


def test_a_subsampled_multi_step_run_is_not_flagged():
    r = many_runs(seed=5, runs=100, fillers=3, steps=4, sample_rate=0.5)
    assert not r.violated and r.steps == 4


def test_bad_arguments_are_refused_with_the_value():
    with pytest.raises(InvalidArgumentError, match="runs >= 10"):
        many_runs(runs=3)
    with pytest.raises(InvalidArgumentError, match="score='mean'"):
        many_runs(score="mean")
    with pytest.raises(InvalidArgumentError, match="spare=0"):
        many_runs(spare=0)


def test_the_cli_audits_many_runs(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["audit", "--runs", "100", "--seed", "1", "--out", str(out)]) == 0
    assert "one canary each" in capsys.readouterr().out
    doc = json.loads((out / "audit.json").read_text())
    assert doc["runs"] == 100 and doc["score"] == "scale"
    assert main(["audit", "--runs", "100", "--seed", "1", "--fault", "realised-batch"]) == 1
    assert "VIOLATED" in capsys.readouterr().out
    assert main(["audit", "--score", "scale"]) == 2
    assert "--score applies to --runs" in capsys.readouterr().err
