"""Live-tensor memory of one steady step, DP against non-private, by torch's memory profiler.

``swiftdp bench`` reads peak RSS, which also counts what the allocator keeps
cached or fragmented. This reads what tensors hold: ``torch.profiler`` with
``profile_memory`` over one steady step (the 7th: neither a batch probe nor
a loss check), the peak of the live bytes above the level at the step's
start, split by the profiler's categories (activations, parameters,
temporaries, ...; ``unknown`` for tensors it cannot place), and the sizes of
the largest tensors live at that peak.

It uses the profiler's private timeline (``torch.profiler._memory_profiler``),
so it may need updating with torch; it measures, it does not test.

Usage::

    .venv/bin/python benchmarks/live_memory.py --model resnet18 [--objective memory] [--top 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from collections import Counter
from typing import Any

import torch
from profile_step import make_steps  # this folder: the same two steps as the profile's
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

from swiftdp.bench.models import get_model

_NAMES = ("parameter", "optimizer", "input", "temporary", "activation", "gradient",
          "autograd", "unknown")


def live_peak(model: str, private: bool, objective: str, top: int) -> tuple[float, dict[str, float],
                                                                            list[float]]:
    """Peak live MB above the step's start, MB per category at the peak, the largest live tensors."""
    spec = get_model(model, "small")
    steps = make_steps(model, "bk", spec.batch_size, "small", cost_objective=objective)
    step = steps[1] if private else steps[0]
    for _ in range(6):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    mp = prof._memory_profile()
    times, sizes = MemoryProfileTimeline(mp)._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    i = max(range(len(totals)), key=totals.__getitem__)
    by_cat = {n: v / 2**20 for n, v in zip(_NAMES, sizes[i][1:], strict=False)}
    live: dict[Any, int] = {}
    for t, action, (key, _version), nbytes in mp.timeline:
        if t != -1 and t / 1000 > times[i]:
            break
        if action in (Action.PREEXISTING, Action.CREATE):
            live[key] = nbytes
        elif action == Action.DESTROY:
            live.pop(key, None)
    largest = sorted((b / 2**20 for b in live.values()), reverse=True)[:top]
    return (totals[i] - totals[0]) / 2**20, by_cat, largest


def main(argv: list[str] | None = None) -> int:
    """Print the live peaks of both methods."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--objective", default="time", help="swiftdp's cost_objective")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    peaks = {}
    for private in (False, True):
        peak, by_cat, largest = live_peak(a.model, private, a.objective, a.top)
        name = "swiftdp" if private else "non-private"
        peaks[name] = peak
        cats = ", ".join(f"{k} {v:.1f}" for k, v in by_cat.items() if v >= 0.05)
        sizes = ", ".join(f"{n} x {s:.2f}" for s, n in sorted(Counter(
            round(v, 2) for v in largest).items(), reverse=True))
        print(f"{a.model} {name}: live peak {peak:.1f} MB above the step's start "
              f"(at the peak, MB: {cats}); largest live: {sizes}")
    print(f"{a.model}: live peak x {peaks['swiftdp'] / peaks['non-private']:.2f} non-private "
          f"(objective {a.objective})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
