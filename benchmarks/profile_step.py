"""Where does swiftdp's extra step time go? A profile of one suite model, DP against non-private.

Three views, each per step (averaged over ``--steps`` profiled steps after
warm-up):

1. phases (``torch.profiler.record_function``): forward + loss, backward
   (for swiftdp this includes the end-of-backward norms, clip factors and
   clipped sums), optimiser step (noise, scaling, SGD);
2. torch ops (``torch.profiler``): self CPU time per aten op, DP minus
   non-private, largest differences first;
3. swiftdp's Python (``cProfile``): cumulative time in the engine's entry
   points and layer rules, and self time per swiftdp source file (the
   Python overhead of the ``TorchFunctionMode``, the hooks and the
   bookkeeping, apart from the torch ops they launch).

Usage::

    .venv/bin/python benchmarks/profile_step.py --model cnn [--mode bk] [--batch-size 64]
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: timings stay sane when other
# processes share the cores. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import cProfile
import pstats
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader

import swiftdp
from swiftdp.bench.methods import _Indices
from swiftdp.bench.models import get_model, suite_loss

StepFn = Callable[[], None]


def make_steps(model_name: str, mode: str, batch: int, size: str,
               cost_objective: str = "time") -> tuple[StepFn, StepFn]:
    """A non-private and a swiftdp step on the same model and batch, with phase labels."""
    spec = get_model(model_name, size)
    x, y = spec.make_batch(batch)
    torch.manual_seed(0)
    base = spec.build().train()
    torch.manual_seed(0)
    dpm = spec.build().train()
    base_opt = torch.optim.SGD(base.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = swiftdp.make_private(
            dpm, torch.optim.SGD(dpm.parameters(), lr=1e-3),
            # the bench's harness: the loader hands out the prebuilt batch (no per-example fetch)
            DataLoader(_Indices(batch), batch_size=batch, collate_fn=lambda _: (x, y)),
            max_grad_norm=1.0, noise_multiplier=1.0, mode=mode, seed=0,
            poisson_sampling=False,  # the same full batch every step, drawn from dp.data_loader
            cost_objective=cost_objective,
        )
    batches = _forever(dp.data_loader)

    def labelled(model: torch.nn.Module, opt: torch.optim.Optimizer, private: bool) -> StepFn:
        def step() -> None:
            bx, by = next(batches) if private else (x, y)  # a DP step needs its loader's batch
            opt.zero_grad(set_to_none=True)
            with record_function("phase: forward+loss"):
                loss = suite_loss(model(bx), by)
            with record_function("phase: backward"):
                loss.backward()
            with record_function("phase: optimizer step"):
                opt.step()

        return step

    return labelled(base, base_opt, False), labelled(dpm, dp.optimizer, True)


def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def op_times(step: StepFn, steps: int) -> dict[str, float]:
    """Self CPU ms per step of every op and phase label."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        key = e.key
        t = (e.cpu_time_total if key.startswith("phase:") else e.self_cpu_time_total)
        out[key] = out.get(key, 0.0) + t / 1e3 / steps
    return out


def python_profile(step: StepFn, steps: int) -> tuple[dict[str, float], dict[str, float], float]:
    """cProfile of ``steps`` steps: (cumulative ms per swiftdp function, self ms per file, total)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    st = pstats.Stats(prof)
    root = os.path.dirname(swiftdp.__file__)
    cum: dict[str, float] = {}
    per_file: dict[str, float] = defaultdict(float)
    total = 0.0
    for (file, line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        if not file.startswith(root) or "/bench/" in file:
            continue
        rel = os.path.relpath(file, root)
        per_file[rel] += 1e3 * tt / steps
        cum[f"{rel}:{line} {fn}"] = 1e3 * ct / steps
    return cum, dict(per_file), 1e3 * total / steps


def main(argv: list[str] | None = None) -> int:
    """Print the three views for one model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--mode", default="bk")
    p.add_argument("--size", default="small")
    p.add_argument("--batch-size", type=int, default=0, help="0: the model's suite batch size")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    batch = a.batch_size or get_model(a.model, a.size).batch_size
    base, dp = make_steps(a.model, a.mode, batch, a.size)
    for _ in range(a.warmup):
        base()
        dp()
    t_base = op_times(base, a.steps)
    t_dp = op_times(dp, a.steps)
    print(f"# {a.model} ({a.size}), batch {batch}, swiftdp mode {a.mode}, "
          f"{torch.get_num_threads()} threads, {a.steps} profiled steps\n")
    print("## phases (ms per step, profiler clock)\n\n| phase | non-private | swiftdp | extra |")
    print("|---|---|---|---|")
    for ph in ("phase: forward+loss", "phase: backward", "phase: optimizer step"):
        b, d = t_base.get(ph, 0.0), t_dp.get(ph, 0.0)
        print(f"| {ph[7:]} | {b:.1f} | {d:.1f} | {d - b:+.1f} |")
    ops = {k for k in t_base.keys() | t_dp.keys() if not k.startswith("phase:")}
    diff = sorted(ops, key=lambda k: t_dp.get(k, 0.0) - t_base.get(k, 0.0), reverse=True)
    print(f"\n## torch ops, self CPU ms per step, top {a.top} by extra\n")
    print("| op | non-private | swiftdp | extra |\n|---|---|---|---|")
    for k in diff[: a.top]:
        b, d = t_base.get(k, 0.0), t_dp.get(k, 0.0)
        print(f"| {k} | {b:.2f} | {d:.2f} | {d - b:+.2f} |")
    tot_b = sum(t_base.get(k, 0.0) for k in ops)
    tot_d = sum(t_dp.get(k, 0.0) for k in ops)
    print(f"| (all ops) | {tot_b:.1f} | {tot_d:.1f} | {tot_d - tot_b:+.1f} |")
    cum, per_file, total = python_profile(dp, a.steps)
    print(f"\n## swiftdp Python (cProfile, inflates Python time; total {total:.1f} ms/step)\n")
    print("| swiftdp file | self ms per step |\n|---|---|")
    for f, t in sorted(per_file.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| {f} | {t:.2f} |")
    print("\n| swiftdp function | cumulative ms per step |\n|---|---|")
    for f, t in sorted(cum.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| {f} | {t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
