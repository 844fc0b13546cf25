"""Measure one (model, method) configuration; run as ``python -m swiftdp.bench.worker``.

The runner starts one fresh process per configuration so that the CPU peak
memory (the process' peak resident set size) belongs to that configuration
alone. In that process:

1. the method's model is built and trained for ``warmup`` steps alone, and the
   peak memory is read (CPU: peak RSS; CUDA: ``max_memory_allocated``); then
   the peak of one later step that checks nothing (steady state: the first
   steps of an output signature also check the loss, a second-derivative
   pass through it);
2. a non-private copy of the same model (same initialisation) is built and
   the two are timed interleaved, one non-private step then one method step
   per round (order reversed every other round), after ``warmup`` rounds;
3. on CUDA, optionally, the largest batch that fits is found by doubling then
   bisection.

The result is printed as one JSON line prefixed with :data:`RESULT_PREFIX`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch import Tensor

from swiftdp.bench.methods import (
    BASELINE,
    MethodSetupError,
    MethodUnavailableError,
    PreparedMethod,
    failure_site,
    opacus_available,
    prepare,
)
from swiftdp.bench.models import SuiteModel, get_model, missing_extra
from swiftdp.bench.timing import interleaved_times, largest_batch, median, plan_rounds

RESULT_PREFIX = "SWIFTDP_BENCH_RESULT "
MAX_BATCH_LIMIT = 1 << 15


def _rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _reset_peak_rss() -> bool:
    """Reset the process' peak RSS (Linux ``/proc/self/clear_refs``); ``False`` where unsupported.

    Memory freed by earlier steps is first handed back to the system
    (glibc's ``malloc_trim``), so the peak that follows is what the process
    holds live plus what the next step needs — not what the allocator kept
    from the first steps' probes and checks.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _hwm_mb() -> float:
    """The peak RSS since the last reset (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 2**10
    raise OSError("no VmHWM in /proc/self/status")


def steady_step_index(done: int) -> int:
    """The first step after ``done`` that checks nothing: not a power of two.

    The engine checks the loss at each output signature's 1st, 2nd, 4th,
    8th, ... step (a second-derivative pass through the loss) and probes
    the first batch of each input signature; the step measured for the
    steady-state memory avoids them.
    """
    k = done + 1
    while k & (k - 1) == 0:
        k += 1
    return k


def _error_text(exc: BaseException) -> str:
    """``Type: message``, cut at the first line break (Opacus puts model reprs after it)."""
    if isinstance(exc, MethodSetupError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = text.split("\n")[0].split("\\n")[0]
    return " ".join(text.split())[:300]


def _build(spec: SuiteModel, method: str, x: Tensor, y: Tensor, device: str,
           seed: int) -> PreparedMethod:
    torch.manual_seed(seed)
    model = spec.build().to(device).train()
    return prepare(method, spec, model, x, y)


def measure(
    spec: SuiteModel,
    method: str,
    *,
    batch_size: int,
    device: str = "cpu",
    warmup: int = 2,
    max_rounds: int = 20,
    min_rounds: int = 5,
    budget_s: float = 0.0,
    find_max_batch: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure ``method`` on ``spec`` against non-private training of the same model.

    Failures of the method (an exception while wrapping the model or
    stepping) are reported in the result, never raised.

    Args:
        spec: the suite model.
        method: a method name (see :mod:`swiftdp.bench.methods`).
        batch_size: examples per step.
        device: ``"cpu"`` or ``"cuda"``.
        warmup: untimed steps before measuring memory and before timing.
        max_rounds: the most timed rounds.
        min_rounds: the fewest timed rounds, whatever ``budget_s``.
        budget_s: time allowed for the timed rounds (0: no limit).
        find_max_batch: on CUDA, also find the largest batch that fits.
        seed: seed of the model initialisation and the synthetic batch.

    Returns:
        A JSON-serialisable dict: ``status`` (``"ok"``, ``"failed"`` or
        ``"unavailable"``: the method's library or the model's extra is not
        installed), ``error``, ``where`` (of a failure), ``notes``, ``step_ms``
        and ``base_step_ms`` (medians), ``ratio``, ``peak_mb``, ``idle_mb``,
        ``steady_peak_mb`` and ``steady_step`` (the peak of one step after the
        warm-up that neither probes nor checks the loss; Linux and CUDA only),
        ``examples_per_s``, ``rounds``, ``max_batch``, ``time_target`` (the
        model's own target, if it has one).
    """
    cuda = device.startswith("cuda")
    sync: Callable[[], None] | None = torch.cuda.synchronize if cuda else None
    res: dict[str, Any] = {
        "model": spec.name, "method": method, "batch_size": batch_size, "device": device,
        "threads": torch.get_num_threads(), "status": "ok", "error": None, "notes": [],
    }
    if spec.time_target is not None:
        res["time_target"] = spec.time_target
    missing = missing_extra(spec)
    if missing is not None:
        res.update(status="unavailable", error=missing)
        return res
    if opacus_available():  # every process loads the same libraries before "idle"
        import opacus  # noqa: F401
    x, y = (t.to(device) for t in spec.make_batch(batch_size, seed))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        res["idle_mb"] = torch.cuda.memory_allocated() / 2**20
    else:
        res["idle_mb"] = _rss_mb()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = _build(spec, method, x, y, device, seed)
            res["notes"] = list(run.notes)
            for _ in range(max(1, warmup)):
                run.step(x, y)
            if sync is not None:
                sync()
            res["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                              else _peak_rss_mb())
            # Steady state: the peak of one step that neither probes nor checks.
            done = max(1, warmup)
            target = steady_step_index(done)
            for _ in range(target - done - 1):
                run.step(x, y)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                run.step(x, y)
                sync()  # type: ignore[misc]
                res["steady_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                res["steady_step"] = target
            elif _reset_peak_rss():
                run.step(x, y)
                res["steady_peak_mb"] = _hwm_mb()
                res["steady_step"] = target
            steps: list[Callable[[], object]] = [lambda: run.step(x, y)]
            if method != BASELINE:
                base = _build(spec, BASELINE, x, y, device, seed)
                steps.insert(0, lambda: base.step(x, y))
            t0 = time.perf_counter()
            times = interleaved_times(
                steps, warmup=1, sync=sync,
                rounds=lambda per_round: plan_rounds(per_round, budget_s, min_rounds, max_rounds),
            )
            res["timing_s"] = time.perf_counter() - t0
    except MethodUnavailableError as exc:
        res.update(status="unavailable", error=str(exc))
        return res
    except Exception as exc:
        res.update(status="failed", error=_error_text(exc))
        if isinstance(exc, MethodSetupError):
            res["notes"] = list(exc.notes)
        where = exc.where if isinstance(exc, MethodSetupError) else failure_site(
            exc, None, batch_size)
        if where:
            res["where"] = where
        res["traceback"] = traceback.format_exc(limit=6)
        return res
    step_s = median(times[-1])
    base_s = median(times[0])
    res.update(
        rounds=len(times[-1]), step_ms=1e3 * step_s, base_step_ms=1e3 * base_s,
        ratio=step_s / base_s, examples_per_s=batch_size / step_s,
        paired_ratio=median([d / b for d, b in zip(times[-1], times[0], strict=True)]),
        step_ms_all=[1e3 * t for t in times[-1]], base_step_ms_all=[1e3 * t for t in times[0]],
    )
    if cuda and find_max_batch:
        del steps
        if method != BASELINE:
            del base
        del run
        try:
            res["max_batch"] = _max_batch(spec, method, device, seed, batch_size)
        except Exception as exc:
            res["max_batch_error"] = _error_text(exc)
    return res


def _max_batch(spec: SuiteModel, method: str, device: str, seed: int, start: int) -> int:
    """Largest CUDA batch for ``method``: a fresh model per try; OOM means it does not fit."""

    def fits(b: int) -> bool:
        gc.collect()
        torch.cuda.empty_cache()
        try:
            xb, yb = (t.to(device) for t in spec.make_batch(b, seed))
            run = _build(spec, method, xb, yb, device, seed)
            run.step(xb, yb)
            torch.cuda.synchronize()
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or an OOM re-raised
            if "out of memory" not in str(exc).lower():
                raise
            return False
        return True  # the model and batch of this try are dropped on return

    return largest_batch(fits, start, MAX_BATCH_LIMIT)


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (the runner fills it in)."""
    p = argparse.ArgumentParser(prog="python -m swiftdp.bench.worker")
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--size", default="small")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=0.0)
    p.add_argument("--max-batch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: measure one configuration and print its JSON result line."""
    a = build_parser().parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    res = measure(
        get_model(a.model, a.size), a.method, batch_size=a.batch_size, device=a.device,
        warmup=a.warmup, max_rounds=a.steps, min_rounds=a.min_steps, budget_s=a.budget_s,
        find_max_batch=a.max_batch, seed=a.seed,
    )
    res["size"] = a.size
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
