"""A real Ctrl-C (SIGINT) to the `swiftdp` process: exit 130, the run resumes to the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from swiftdp.api.checkpoint import read as read_checkpoint
from swiftdp.cli.main import main

ARGS = ["train", "--dataset", "digits", "--batch-size", "256", "--seed", "5", "--quiet",
        "--accountant", "rdp"]


def _interrupted_run(out: Path) -> tuple[int, str]:
    exe = Path(sys.executable).parent / "swiftdp"
    argv = [str(exe), *ARGS, "--epochs", "12", "--out", str(out)]
    # A shell running the suite in the background passes SIGINT on as ignored;
    # the child gets the default disposition, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.json"
        if metrics.exists() and json.loads(metrics.read_text())["epochs"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_real_ctrl_c_exits_130_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    code, err = _interrupted_run(out)
    assert code == 130, err
    assert "Traceback" not in err and f"--resume {out}" in err
    done = json.loads((out / "metrics.json").read_text())["epochs"]
    assert read_checkpoint(out / "checkpoint.pt")["extra"]["epoch"] >= len(done)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    final = json.loads((out / "metrics.json").read_text())
    assert final["final"]["steps"] == 12 * 5
    assert [e["epoch"] for e in final["epochs"]] == list(range(1, 13))
