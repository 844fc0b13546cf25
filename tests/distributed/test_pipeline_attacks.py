"""Attacks on pipeline stages, two gloo ranks launched by ``torchrun``.

A stage before the last has no loss the engine can check; swiftdp owns the
exchange between stages (:mod:`swiftdp.pipeline`). Ordinary-looking loop
code that would let examples influence each other's gradients, or the stages
draw different samples or share noise, is refused before any step releases
an update: a loss of an inner activation, sending a function of the output,
two forwards, a forward hook added after ``make_private`` that mixes the
rows, an in-place change of the output, a hook that mixes the received
gradient, a step before the backward, a sampler rewound on one stage, and
one stage's optimizer state (noise stream) loaded into another; debug
checks switched on for one rank only. A term the
last stage adds on the received tensor, or on the model's own input reached
through a pre-hook added after ``make_private`` or a handle the model keeps,
does not reach the gradient sent back (the gradient is the model's own
vector-Jacobian product; every update is bitwise that of the clean run). Through
``make_private`` and the library's exchange, max_j ‖S(D) − S(D∖j)‖ over both
stages' clipped sums is at most √(C_0² + C_1²) and, every example clipped,
nearly that.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from support.ranks import TORCHRUN, free_port

WORKER = Path(__file__).with_name("pipeline_attack_worker.py")

# attack -> (the stage that refuses it, a phrase of the refusal)
REFUSED = {
    "inner loss": (0, "did not come from dp.stage_backward()"),
    "function of output": (0, "not the stage model's output"),
    "two forwards": (0, "ran its model again"),
    "late forward hook": (0, "mixes the examples"),  # (the independence probe, first)
    "in-place change": (0, "not the stage model's output"),
    "gradient hook": (0, "not the one received"),
    "step before stage_backward": (0, "before dp.stage_backward()"),
    "sampler on one stage": (None, "drew different samples"),
    "copied noise state": (None, "same noise generator state"),
}


def _run(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "attacks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out)}
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(WORKER)],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_pipeline_attacks_are_refused_and_the_sensitivity_holds(tmp_path):
    r = _run(tmp_path)
    found = r["attacks"]
    for name, (stage, phrase) in REFUSED.items():
        for rank in (0, 1) if stage is None else (stage,):
            text = found[rank][name]
            assert "ACCEPTED" not in text and "CHANGED" not in text, (name, rank, text)
            assert phrase in text, (name, rank, text)
    for rank in (0, 1):  # no update anywhere on any attack
        assert all("CHANGED" not in v for v in found[rank].values()), found[rank]
    for text in r["debug"]:  # debug checks on one rank only: refused on both
        assert "disagree on debug mode (SWIFTDP_DEBUG_DISTRIBUTED)" in text, text
    # a last-stage term on the received tensor, or on the model's input reached through a
    # late pre-hook or a handle the model cached, changes no stage's update (bitwise)
    for stage in r["regulariser"]:
        assert set(stage["difference"]) == {"clean", "received", "late pre-hook",
                                            "cached input"}, stage
        assert all(d == 0.0 for d in stage["difference"].values()), stage
        assert stage["size"] > 1e-3, stage
    sens = r["sensitivity"]
    assert sens["sensitivity"] <= sens["bound"] * (1 + 1e-9), sens
    assert sens["sensitivity"] >= 0.99 * sens["bound"], sens
