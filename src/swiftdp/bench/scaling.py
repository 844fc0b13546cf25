"""Data-parallel scaling: non-private DDP against data-parallel swiftdp, at 1, 2, ... ranks.

``python -m swiftdp.bench.scaling --nproc 1,2 --out DIR`` (or ``swiftdp bench
--nproc 1,2``) launches, per model and rank count, one ``torchrun`` of
:func:`worker_main` on a gloo process group (CPU), bounded by a wall-clock and a
process-group timeout. Every rank of it builds the same model twice (same seed):

* **DDP**: ``DistributedDataParallel``, SGD, a fixed synthetic batch of
  ``batch_size / W`` per rank; the all-reduce overlaps the backward in buckets.
* **swiftdp**: :func:`swiftdp.make_private` in the process group (mode ``bk``
  unless asked, σ = 1, C = 1): the loader's ``batch_size`` is the *global*
  expected batch, each rank trains on its share of one Poisson sample, and
  ``optimizer.step()`` all-reduces clipped sums plus noise (and a few scalars
  for the step checks) once per step (:mod:`swiftdp.distributed`).

The two are **timed interleaved** (one step of each per round, order reversed
every other round) after warm-up rounds, a ``dist.barrier()`` before every timed
step (not timed; nor is drawing the batch). A step takes as long as its slowest
rank; the table gives medians over steps, ``examples/s = batch_size / median``,
the speed-up from the fewest ranks and swiftdp / DDP within one run. Rounds are
fixed in number (every rank must run the same collectives). Poisson shares
differ: the slowest of 2 ranks trains on about ``B/2 + 0.56·sqrt(B/2)``
examples (``max_share``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp import distributed
from swiftdp.bench.methods import LR, MAX_GRAD_NORM, NOISE_MULTIPLIER
from swiftdp.bench.models import SuiteModel, describe, get_model
from swiftdp.bench.runner import machine_info
from swiftdp.bench.timing import median

SCALING_MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer")
DATA_BATCHES = 8  # the synthetic dataset holds this many expected batches (q = 1/8)
METHODS: tuple[str, str] = ("ddp", "swiftdp")


@dataclass(frozen=True)
class ScalingConfig:
    """What the scaling benchmark runs.

    Attributes:
        models: suite model names (:mod:`swiftdp.bench.models`).
        nprocs: rank counts, e.g. ``(1, 2)``; every count must divide the batch.
        size: model size (``"small"`` or ``"medium"``).
        batch_size: the global (expected) batch, or ``None`` for each model's default.
        steps: timed rounds per run (one DDP and one swiftdp step each).
        warmup: untimed rounds first.
        threads: torch threads per rank.
        repeats: runs per (model, rank count), alternating the order of the
            rank counts; their steps are pooled.
        mode: swiftdp's engine mode.
        timeout_s: a ``torchrun`` taking longer is killed and reported failed.
        pg_timeout_s: the process group's timeout (a rank waiting longer on a
            crashed peer gives up).
        omp_wait_policy: ``OMP_WAIT_POLICY`` of the ranks (``""``: inherit).
        seed: model initialisation, data and sampling seed.
    """

    models: tuple[str, ...] = SCALING_MODELS
    nprocs: tuple[int, ...] = (1, 2)
    size: str = "small"
    batch_size: int | None = None
    steps: int = 20
    warmup: int = 3
    threads: int = 1
    repeats: int = 1
    mode: str = "bk"
    timeout_s: float = 600.0
    pg_timeout_s: float = 60.0
    omp_wait_policy: str = "passive"
    seed: int = 0


# ------------------------------------------------------------------ one rank
def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _allreduce_ms(numel: int, reps: int = 10) -> float:
    """Median time of one fp32 all-reduce of ``numel`` elements (the gradient's size)."""
    buf = torch.zeros(numel, dtype=torch.float32)
    times = []
    for _ in range(reps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times[2:])


def measure_rank(spec: SuiteModel, *, batch_size: int, steps: int, warmup: int,
                 mode: str = "bk", seed: int = 0) -> dict[str, Any]:
    """Time DDP and swiftdp steps interleaved on this rank of an initialised process group.

    Args:
        spec: the suite model.
        batch_size: the global batch (DDP: ``batch_size / W`` per rank; swiftdp:
            the expected size of the one Poisson sample the ranks share).
        steps: timed rounds.
        warmup: untimed rounds first.
        mode: swiftdp's engine mode.
        seed: model, data and sampling seed (the same on every rank).

    Returns:
        This rank's ``ddp_s`` and ``swiftdp_s`` (seconds per timed step),
        ``local_batch`` (its swiftdp share at each timed step), ``params``
        and ``allreduce_ms``.

    Raises:
        ValueError: the world size does not divide ``batch_size``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if batch_size % world:
        raise ValueError(f"Expected batch_size divisible by the {world} ranks, got {batch_size}.")
    share = batch_size // world
    x_all, y_all = spec.make_batch(batch_size * DATA_BATCHES, seed)
    xd, yd = x_all[rank * share:(rank + 1) * share], y_all[rank * share:(rank + 1) * share]

    torch.manual_seed(seed)
    ddp = nn.parallel.DistributedDataParallel(spec.build().train())
    ddp_opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)

    from swiftdp.api.private import make_private

    torch.manual_seed(seed)
    model = spec.build().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # δ vs 1/N of a synthetic dataset
        dp = make_private(model, opt, loader, max_grad_norm=MAX_GRAD_NORM,
                          noise_multiplier=NOISE_MULTIPLIER, mode=mode, seed=seed)
    dp_opt = dp.optimizer
    batches = _forever(dp.data_loader)

    def ddp_step(b: tuple[Tensor, Tensor]) -> None:
        ddp_opt.zero_grad(set_to_none=True)
        spec.loss(ddp, *b).backward()
        ddp_opt.step()

    def dp_step(b: tuple[Tensor, Tensor]) -> None:
        dp_opt.zero_grad(set_to_none=True)
        if len(b[0]):  # an empty share: no backward, step() adds this rank's noise share
            spec.loss(model, *b).backward()
        dp_opt.step()

    draws: list[Callable[[], Any]] = [lambda: (xd, yd), lambda: next(batches)]
    steps_: list[Callable[[tuple[Tensor, Tensor]], None]] = [ddp_step, dp_step]
    times: list[list[float]] = [[], []]
    local: list[int] = []
    for r in range(warmup + steps):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            b = draws[i]()  # drawing the batch is not timed
            dist.barrier()  # start together; the barrier is not timed either
            t0 = time.perf_counter()
            steps_[i](b)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[i].append(dt)
                if i == 1:
                    local.append(len(b[0]))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"ddp_s": times[0], "swiftdp_s": times[1], "local_batch": local,
            "params": params, "allreduce_ms": _allreduce_ms(params)}


def combine_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's result from every rank's: a step takes as long as its slowest rank.

    Returns:
        ``ddp_s`` and ``swiftdp_s`` (per step, max over ranks), ``global_batch``
        and ``max_share`` (per step: sum and max of the ranks' swiftdp shares),
        ``params`` and ``allreduce_ms`` (rank 0's).
    """
    def slowest(key: str) -> list[float]:
        return [max(vals) for vals in zip(*(r[key] for r in per_rank), strict=True)]

    shares = list(zip(*(r["local_batch"] for r in per_rank), strict=True))
    return {"ddp_s": slowest("ddp_s"), "swiftdp_s": slowest("swiftdp_s"),
            "global_batch": [sum(s) for s in shares], "max_share": [max(s) for s in shares],
            "params": per_rank[0]["params"], "allreduce_ms": per_rank[0]["allreduce_ms"]}


def worker_main(argv: list[str] | None = None) -> int:
    """One rank (under ``torchrun``): measure, and rank 0 writes the run's JSON to ``--out``.

    Arguments: ``--worker --model NAME --config JSON --out PATH`` (the JSON of a
    :class:`ScalingConfig`, as :func:`torchrun_command` writes it).
    """
    p = argparse.ArgumentParser(prog="python -m swiftdp.bench.scaling --worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--model", required=True)
    p.add_argument("--config", type=lambda t: ScalingConfig(**json.loads(t)), required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    cfg: ScalingConfig = a.config
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.pg_timeout_s))
    rank = dist.get_rank()
    try:
        mine = measure_rank(get_model(a.model, cfg.size), batch_size=batch_of(cfg, a.model),
                            steps=cfg.steps, warmup=cfg.warmup, mode=cfg.mode, seed=cfg.seed)
        mine["threads"] = torch.get_num_threads()
    except Exception as exc:  # reported in the JSON; the peer fails its next collective
        a.out.write_text(json.dumps({"status": "failed", "rank": rank,
                                     "error": f"{type(exc).__name__}: {exc}"[:500],
                                     "traceback": traceback.format_exc(limit=8)}))
        return 1
    everyone = _gather(mine)
    if rank == 0:
        a.out.write_text(json.dumps({"status": "ok", **combine_ranks(everyone),
                                     "threads": mine["threads"]}))
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    distributed.exit_process(0)


# ------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(cfg: ScalingConfig, model: str, nproc: int, out: Path) -> list[str]:
    """The ``torchrun`` command line of one run (``nproc`` ranks on this machine)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "swiftdp.bench.scaling", "--worker", "--model", model,
        "--config", json.dumps(asdict(cfg)), "--out", str(out),
    ]


def _cpu_clock() -> tuple[float, float, float] | None:
    """(wall s, CPU-seconds the machine was busy, CPU-seconds of our waited-for children)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system, irq softirq steal
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"),
            own.ru_utime + own.ru_stime)


def others_cpu_share(before: tuple[float, float, float] | None,
                     after: tuple[float, float, float] | None) -> float | None:
    """The share of the machine's cores that other processes used between two readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others) / ((after[0] - before[0]) * (os.cpu_count() or 1))


def batch_of(cfg: ScalingConfig, model: str) -> int:
    """The global batch of ``model``: the configured one, else the model's suite default."""
    return cfg.batch_size or get_model(model, cfg.size).batch_size


def run_one(cfg: ScalingConfig, model: str, nproc: int) -> dict[str, Any]:
    """One ``torchrun`` of ``nproc`` ranks; a crash or timeout becomes a failed result."""
    base: dict[str, Any] = {"model": model, "nproc": nproc}
    clock = _cpu_clock()
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(max(1, cfg.threads))}
    if cfg.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = cfg.omp_wait_policy.upper()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        proc = subprocess.Popen(torchrun_command(cfg, model, nproc, out), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: a timeout kills all ranks
        try:
            _, stderr = proc.communicate(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return base | {"status": "failed", "error": f"timed out after {cfg.timeout_s:.0f} s"}
        res: dict[str, Any] | None = json.loads(out.read_text()) if out.exists() else None
    base["others_cpu"] = others_cpu_share(clock, _cpu_clock())
    if res is None or (proc.returncode != 0 and res.get("status") == "ok"):
        tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
        return base | {"status": "failed",
                       "error": f"torchrun exited with code {proc.returncode}: {tail}"}
    return base | res


def run_scaling(cfg: ScalingConfig, *, runner: Callable[[ScalingConfig, str, int],
                                                        dict[str, Any]] = run_one,
                progress: bool = True) -> list[dict[str, Any]]:
    """Every model at every rank count, ``repeats`` times (rank order alternating).

    Returns:
        One pooled result per (model, rank count): see :func:`pool`.
    """
    runs: list[dict[str, Any]] = []
    for model in cfg.models:
        for rep in range(cfg.repeats):
            for nproc in cfg.nprocs if rep % 2 == 0 else cfg.nprocs[::-1]:
                r = runner(cfg, model, nproc) | {"repeat": rep}
                runs.append(r)
                if progress:
                    print(f"{model:>12} {nproc} rank(s), run {rep + 1}: " + (
                        f"DDP {1e3 * median(r['ddp_s']):.1f} ms, swiftdp "
                        f"{1e3 * median(r['swiftdp_s']):.1f} ms" if r["status"] == "ok"
                        else f"FAILED: {r.get('error')}"), file=sys.stderr, flush=True)
    return pool(cfg, runs)


def pool(cfg: ScalingConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool the repeats of each (model, rank count); medians, examples/s, ratios, speed-ups.

    Each result has ``model``, ``nproc``, ``batch_size``, ``status`` and, when
    ok, per method (``ddp``, ``swiftdp``) ``<m>_step_ms`` (median over the
    pooled steps), ``<m>_examples_per_s``, ``<m>_speedup`` (against the fewest
    ranks measured for that model), ``ratio`` (swiftdp / DDP medians),
    ``global_batch_mean``, ``max_share_mean``, ``params``, ``grad_mb`` (fp32),
    ``allreduce_ms`` and the raw per-step times ``<m>_step_ms_all``.
    """
    out: list[dict[str, Any]] = []
    for model in cfg.models:
        batch = batch_of(cfg, model)
        first: dict[str, float] = {}
        for nproc in sorted(set(cfg.nprocs)):
            mine = [r for r in runs if r["model"] == model and r["nproc"] == nproc]
            ok = [r for r in mine if r.get("status") == "ok"]
            row: dict[str, Any] = {"model": model, "nproc": nproc, "batch_size": batch,
                                   "runs": len(mine)}
            if not ok:
                errors = "; ".join(str(r.get("error")) for r in mine)
                out.append(row | {"status": "failed", "error": errors or "not run"})
                continue
            row["status"] = "ok"
            for m in METHODS:
                steps = [t for r in ok for t in r[f"{m}_s"]]
                step = median(steps)
                first.setdefault(m, step)
                row |= {f"{m}_step_ms": 1e3 * step, f"{m}_examples_per_s": batch / step,
                        f"{m}_speedup": first[m] / step,
                        f"{m}_step_ms_all": [1e3 * t for t in steps]}
            shares = [s for r in ok for s in r["max_share"]]
            sizes = [s for r in ok for s in r["global_batch"]]
            row |= {"ratio": row["swiftdp_step_ms"] / row["ddp_step_ms"],
                    "steps": len(row["ddp_step_ms_all"]),
                    "global_batch_mean": sum(sizes) / len(sizes),
                    "max_share_mean": sum(shares) / len(shares),
                    "params": ok[0]["params"], "grad_mb": 4 * ok[0]["params"] / 2**20,
                    "allreduce_ms": median([r["allreduce_ms"] for r in ok]),
                    "others_cpu": [r.get("others_cpu") for r in ok],
                    "threads": ok[0].get("threads")}
            out.append(row)
    return out


# ------------------------------------------------------------------- report
def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (model, rank count): DDP and swiftdp step time, examples/s, speed-up, ratio."""
    head = ["model", "params", "global batch", "ranks", "DDP step ms", "DDP ex/s",
            "DDP speed-up", "swiftdp step ms", "swiftdp ex/s", "swiftdp speed-up",
            "swiftdp / DDP", "largest share (B/W)", "fp32 all-reduce ms", "steps", "others' CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | | {r['batch_size']} | {r['nproc']} | FAILED: "
                         f"{str(r.get('error'))[:200].replace('|', '/')} |" + " |" * 10)
            continue
        shares = [100 * v for v in r.get("others_cpu") or [] if v is not None]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['nproc']} | "
            f"{r['ddp_step_ms']:.1f} | {r['ddp_examples_per_s']:.0f} | {r['ddp_speedup']:.2f} | "
            f"{r['swiftdp_step_ms']:.1f} | {r['swiftdp_examples_per_s']:.0f} | "
            f"{r['swiftdp_speedup']:.2f} | {r['ratio']:.2f} | {r['max_share_mean']:.1f} "
            f"({r['batch_size'] / r['nproc']:.0f}) | {r['allreduce_ms']:.2f} | {r['steps']} | "
            + (f"{min(shares):.0f}–{max(shares):.0f}%" if shares else "—") + " |")
    return "\n".join(lines)


def git_commit() -> dict[str, Any]:
    """The commit (``git rev-parse HEAD``) and what of ``src/`` differs from it (``None``: no git).

    ``dirty`` says whether the tree had any change; ``src_changes`` lists the
    changed or new files under ``src/`` and ``src_diff_sha256`` hashes their
    diff against the commit, so a run on an uncommitted tree can be matched later.
    """
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    import hashlib

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    src = git("status", "--porcelain", "--", "src")
    diff = git("diff", "HEAD", "--", "src")
    new = [line[3:] for line in (src or "").splitlines() if line.startswith("??")]
    blob = (diff or "") + "".join(Path(f).read_text(encoding="utf-8", errors="replace")
                                  for f in new if Path(f).is_file())
    return {"commit": None if commit is None else commit.strip(),
            "dirty": None if status is None else bool(status.strip()),
            "src_changes": None if src is None else [ln[3:] for ln in src.splitlines()],
            "src_diff_sha256": hashlib.sha256(blob.encode()).hexdigest() if src else None}


def write_results(cfg: ScalingConfig, results: list[dict[str, Any]], out: Path,
                  command: str) -> str:
    """Write ``results.json`` and ``table.md`` to ``out``; return the markdown written."""
    meta = machine_info(cfg.threads, "cpu") | git_commit() | {
        "command": command, "config": asdict(cfg),
        "models": {m: describe(m, cfg.size) for m in cfg.models},
    }
    head = (f"swiftdp data-parallel scaling — {meta['cpu']}, {meta['cores']} cores, "
            f"{cfg.threads} thread(s) per rank, gloo, torch {meta['torch']}, "
            f"commit {str(meta['commit'])[:12]}{' (dirty tree)' if meta['dirty'] else ''}, "
            f"{meta['date']}")
    text = (f"{head}\n\nCommand: `{command}`\n\n{markdown_table(results)}\n\n"
            "Step: median of the slowest rank's step time; ex/s = global batch / median; "
            "speed-up against the fewest ranks, same method; swiftdp / DDP within one run "
            "(interleaved). Largest share: mean of the largest rank's Poisson share (DDP: "
            "B/W). Others' CPU: share of the cores other processes used during each run "
            "(/proc/stat minus the run's own CPU time); above a few % the run shared cores.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str), encoding="utf-8")
    (out / "table.md").write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------- CLI
def _split(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def check_config(cfg: ScalingConfig) -> None:
    """Refuse unknown models, counts below 1 and rank counts that cannot split a batch.

    Raises:
        ValueError: naming the option (an unknown model: ``InvalidArgumentError``).
    """
    for name, v in (("--nproc", min(cfg.nprocs, default=0)), ("--steps", cfg.steps),
                    ("--repeats", cfg.repeats)):
        if v < 1:
            raise ValueError(f"Expected {name} >= 1, got {v}.")
    for m in cfg.models:
        b = batch_of(cfg, m)
        if bad := [n for n in cfg.nprocs if b % n]:
            raise ValueError(f"The global batch {b} of {m!r} does not split over {bad} ranks: "
                             "pass --batch-size divisible by every --nproc count.")


def build_parser() -> argparse.ArgumentParser:
    """``python -m swiftdp.bench.scaling``'s options (defaults: :class:`ScalingConfig`)."""
    p = argparse.ArgumentParser(prog="python -m swiftdp.bench.scaling",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    d = ScalingConfig()
    p.add_argument("--nproc", type=lambda t: tuple(map(int, _split(t))), default=d.nprocs,
                   help="comma-separated rank counts")
    p.add_argument("--models", type=_split, default=d.models, help="comma-separated models")
    p.add_argument("--size", default=d.size)
    p.add_argument("--batch-size", type=int, default=None, help="the global batch")
    for opt, help_ in (("steps", "timed rounds per run"), ("warmup", "untimed rounds first"),
                       ("threads", "torch threads per rank"),
                       ("repeats", "runs per (model, ranks), rank order alternating")):
        p.add_argument(f"--{opt}", type=int, default=getattr(d, opt), help=help_)
    p.add_argument("--mode", default=d.mode, help="swiftdp engine mode")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--out", type=Path, default=Path("bench_results/scaling"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the scaling benchmark (or, with ``--worker``, one rank of it)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker_main(argv)
    a = build_parser().parse_args(argv)
    cfg = ScalingConfig(models=a.models, nprocs=a.nproc, size=a.size, batch_size=a.batch_size,
                        steps=a.steps, warmup=a.warmup, threads=a.threads, repeats=a.repeats,
                        mode=a.mode, timeout_s=a.timeout_s)
    return run_config(cfg, a.out, shlex.join(["python", "-m", "swiftdp.bench.scaling", *argv]))


def run_config(cfg: ScalingConfig, out: Path, command: str, progress: bool = True) -> int:
    """Check ``cfg``, run it, print and write the table; 0 if every run succeeded, else 1."""
    try:
        check_config(cfg)
    except ValueError as exc:
        print(f"swiftdp: error: {exc}", file=sys.stderr)
        return 2
    results = run_scaling(cfg, progress=progress)
    print(write_results(cfg, results, out, command))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
