"""Clipping-engine overhead: the DP step against the non-private step of the same model.

The engine's acceptance check: on the 2-core CPU, batch 64, flat clipping,
swiftdp's default mode (book-keeping) should cost at most 1.3x the
non-private step for

* a GroupNorm CNN on 32x32x3 (``cnn`` of the suite), and
* a 2-layer transformer encoder, d = 128, T = 64, stock ``nn.MultiheadAttention``
  (``encoder`` of the suite);

Opacus 1.6 (hooks, after ``ModuleValidator.fix`` swaps the attention module
for ``DPMultiheadAttention``) is measured alongside. All three steps
(non-private, swiftdp, Opacus) are full optimiser steps, noise included, and
run interleaved in this one process, one of each per round (order reversed
every other round), so that machine drift hits them alike.

Usage::

    .venv/bin/python benchmarks/engine_overhead.py [--steps 20] [--threads 2] [--check]
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: timings stay sane when other
# processes share the cores. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import warnings
from collections.abc import Callable

import torch

from swiftdp.bench.methods import BASELINE, PreparedMethod, opacus_available, prepare
from swiftdp.bench.models import get_model
from swiftdp.bench.timing import interleaved_times, median

MODELS = ("cnn", "encoder")
TARGET = 1.3


def _prepared(model_name: str, method: str, batch: int) -> tuple[PreparedMethod | None, str]:
    spec = get_model(model_name)
    x, y = spec.make_batch(batch)
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return prepare(method, spec, spec.build().train(), x, y), ""
    except Exception as exc:  # reported, not raised
        return None, f"{type(exc).__name__}: {exc}"


def measure_model(model_name: str, methods: list[str], batch: int, steps: int,
                  warmup: int) -> dict[str, tuple[float, str]]:
    """Median step time (ms) of each method and its notes, timed interleaved."""
    spec = get_model(model_name)
    x, y = spec.make_batch(batch)
    runs: dict[str, PreparedMethod] = {}
    out: dict[str, tuple[float, str]] = {}
    for m in methods:
        run, err = _prepared(model_name, m, batch)
        if run is None:
            out[m] = (float("nan"), "FAILED: " + err)
        else:
            runs[m] = run
    names = list(runs)

    def bind(r: PreparedMethod) -> Callable[[], None]:
        return lambda: r.step(x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved_times([bind(runs[m]) for m in names], warmup=warmup, rounds=steps)
    for m, ts in zip(names, times, strict=True):
        out[m] = (1e3 * median(ts), "; ".join(runs[m].notes))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the step times and ratios; with ``--check``, exit 1 when swiftdp misses 1.3x."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-opacus", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 if swiftdp > 1.3x non-private")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    methods = [BASELINE, "swiftdp"]
    if opacus_available() and not a.no_opacus:
        methods.append("opacus-hooks")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch_size}, "
          f"{a.steps} interleaved steps after {a.warmup} warm-up, flat clipping, sigma=1\n")
    print("| model | method | step ms | x non-private | notes |\n|---|---|---|---|---|")
    missed = False
    for name in MODELS:
        res = measure_model(name, methods, a.batch_size, a.steps, a.warmup)
        base = res[BASELINE][0]
        for m in methods:
            ms, notes = res[m]
            ratio = ms / base
            print(f"| {name} | {m} | {ms:.1f} | {ratio:.2f} | {notes} |")
            if m == "swiftdp" and not ratio <= TARGET:
                missed = True
    print(f"\nswiftdp target <= {TARGET}x: {'MISSED' if missed else 'met'}")
    return 1 if (a.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
