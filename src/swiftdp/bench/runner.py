"""Run the suite: one fresh worker process per (model, method), with a progress bar.

See :mod:`swiftdp.bench.worker` for what each process measures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from swiftdp.bench.methods import BASELINE, OPACUS_METHODS, opacus_available
from swiftdp.bench.models import get_model, missing_extra
from swiftdp.bench.worker import RESULT_PREFIX


@dataclass(frozen=True)
class SuiteConfig:
    """What to run and how.

    Attributes:
        models: suite model names.
        methods: method names (``nonprivate`` is always measured, first: it is
            the reference of every ratio).
        size: ``"small"`` or ``"medium"``.
        batch_size: examples per step, or ``None`` for each model's default.
        steps: the most timed rounds per configuration.
        min_steps: the fewest timed rounds per configuration.
        warmup: untimed steps before measuring.
        budget_s: time allowed for one configuration's timed rounds (0: none).
        threads: torch threads in every worker (0: torch's default).
        device: ``"cpu"`` or ``"cuda"``.
        max_batch: on CUDA, also find the largest batch that fits.
        timeout_s: a worker running longer is stopped and reported failed.
        omp_wait_policy: ``OMP_WAIT_POLICY`` of the workers (``"passive"``:
            idle OpenMP threads sleep instead of spinning, which keeps timings
            sane when other processes share the cores; ``""``: inherit).
        extra_env: more environment variables for the workers.
    """

    models: tuple[str, ...]
    methods: tuple[str, ...]
    size: str = "small"
    batch_size: int | None = None
    steps: int = 20
    min_steps: int = 5
    warmup: int = 2
    budget_s: float = 10.0
    threads: int = 0
    device: str = "cpu"
    max_batch: bool = False
    timeout_s: float = 900.0
    omp_wait_policy: str = "passive"
    extra_env: dict[str, str] = field(default_factory=dict)


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """CPU model, core count, torch/opacus versions, threads and (on CUDA) the GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "threads": threads or torch.get_num_threads(),
        "device": device, "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if opacus_available():
        import opacus

        info["opacus"] = opacus.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def worker_command(cfg: SuiteConfig, model: str, method: str) -> list[str]:
    """The command line of the worker process for one configuration."""
    batch = cfg.batch_size or get_model(model, cfg.size).batch_size
    cmd = [
        sys.executable, "-m", "swiftdp.bench.worker", "--model", model, "--method", method,
        "--size", cfg.size, "--batch-size", str(batch), "--device", cfg.device,
        "--threads", str(cfg.threads), "--warmup", str(cfg.warmup),
        "--steps", str(cfg.steps), "--min-steps", str(cfg.min_steps),
        "--budget-s", str(cfg.budget_s),
    ]
    if cfg.max_batch:
        cmd.append("--max-batch")
    return cmd


def parse_worker_output(stdout: str) -> dict[str, Any] | None:
    """The result dict from a worker's stdout, or ``None`` if it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            out: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return out
    return None


def run_worker(cfg: SuiteConfig, model: str, method: str) -> dict[str, Any]:
    """Run one configuration in a fresh process; a crash or timeout becomes a failed result."""
    base: dict[str, Any] = {"model": model, "method": method, "notes": [], "size": cfg.size}
    missing = missing_extra(get_model(model, cfg.size))
    if missing is not None:
        return base | {"status": "unavailable", "error": missing}
    if method in OPACUS_METHODS and not opacus_available():
        return base | {"status": "unavailable",
                       "error": "Opacus is not installed (pip install 'swiftdp[bench]')."}
    env = dict(os.environ) | cfg.extra_env
    if cfg.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = cfg.omp_wait_policy.upper()
    try:
        proc = subprocess.run(
            worker_command(cfg, model, method), capture_output=True, text=True,
            timeout=cfg.timeout_s, env=env, check=False,
        )
    except subprocess.TimeoutExpired:
        return base | {"status": "failed", "error": f"timed out after {cfg.timeout_s:.0f} s"}
    res = parse_worker_output(proc.stdout)
    if res is None:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        return base | {"status": "failed",
                       "error": f"worker exited with code {proc.returncode}: {tail}"}
    return res


Runner = Callable[[SuiteConfig, str, str], dict[str, Any]]


def summary_line(r: dict[str, Any]) -> str:
    """One line about a finished configuration (printed above the progress bar)."""
    head = f"{r['model']:>15} {r['method']:<20}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status', 'failed').upper()}: {str(r.get('error'))[:100]}"
    return (f"{head} {r['step_ms']:9.1f} ms  x{r['ratio']:.2f} time  "
            f"peak {r['peak_mb']:.0f} MB  ({r['rounds']} steps)")


def run_suite(cfg: SuiteConfig, *, runner: Runner = run_worker, progress: bool = True,
              partial: Path | None = None) -> list[dict[str, Any]]:
    """Measure every model x method of ``cfg``, non-private first for each model.

    Args:
        cfg: the suite configuration.
        runner: measures one configuration (default: a fresh worker process).
        progress: show a tqdm progress bar and a line per finished
            configuration on stderr.
        partial: if given, each result is appended to this JSON-lines file
            as soon as it is known (a long run can be inspected, or salvaged).

    Returns:
        One result dict per configuration, in run order (the non-private
        one first for each model), each with ``mem_ratio`` filled in
        against the model's non-private peak.
    """
    methods = [BASELINE] + [m for m in cfg.methods if m != BASELINE]
    jobs = [(mo, me) for mo in cfg.models for me in methods]
    results: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="bench", unit="cfg", disable=not progress, file=sys.stderr)
    for model, method in bar:
        bar.set_description(f"{model} / {method}")
        res = runner(cfg, model, method)
        results.append(res)
        if progress:
            bar.write(summary_line(res), file=sys.stderr)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("a", encoding="utf-8") as f:
                f.write(json.dumps(res, default=str) + "\n")
    bar.close()
    add_memory_ratios(results)
    return results


def add_memory_ratios(results: list[dict[str, Any]]) -> None:
    """Fill ``mem_ratio`` (raw peaks), ``train_mem_ratio`` (peaks above idle) and
    ``steady_mem_ratio`` (a steady-state step's peak above idle) in place."""
    base = {r["model"]: r for r in results if r["method"] == BASELINE and r.get("status") == "ok"}
    for r in results:
        b = base.get(r["model"])
        if r.get("status") != "ok" or b is None or "peak_mb" not in r:
            continue
        r["train_mb"] = r["peak_mb"] - r["idle_mb"]
        b_train = b["peak_mb"] - b["idle_mb"]
        r["mem_ratio"] = r["peak_mb"] / b["peak_mb"]
        r["train_mem_ratio"] = r["train_mb"] / b_train if b_train > 0 else None
        if "steady_peak_mb" in r and "steady_peak_mb" in b:
            r["steady_mb"] = r["steady_peak_mb"] - r["idle_mb"]
            b_steady = b["steady_peak_mb"] - b["idle_mb"]
            r["steady_mem_ratio"] = r["steady_mb"] / b_steady if b_steady > 0 else None
