"""``swiftdp bench``: speed and memory against non-private training and Opacus.

Wiring (in the CLI's main module)::

    from swiftdp.bench import cli as bench_cli
    bench_cli.add_parser(subparsers)   # sets ``func=bench_cli.run``

Also runnable alone as ``python -m swiftdp.bench``.

``--models`` takes model names and group names: ``default`` (the suite, run
when ``--models`` is not given) and ``hf`` (the Hugging Face rows: GPT-2
small full and LoRA, BERT-base, a Llama; slow on a CPU, need the ``[hf]``
extra), e.g. ``--models hf`` or ``--models default,hf``.

``--nproc 1,2`` runs the data-parallel scaling benchmark instead
(:mod:`swiftdp.bench.scaling`: non-private DDP against data-parallel swiftdp
under ``torchrun``, gloo); ``--models`` then defaults to ``mlp,cnn,transformer``
and ``--threads`` (per rank) to 1; ``--methods`` does not apply.

``--sweep`` runs the cost sweep instead (:mod:`swiftdp.bench.sweep`): the
DP / non-private step-time ratio of a transformer block and a conv block as
width, sequence length and batch grow, for the shipped ghost-or-instantiate
choice and each side forced, against the flop model; ``sweep.json``,
``sweep.md`` and ``sweep.png`` in ``--out``. Only ``--out``, ``--quick``,
``--threads`` (default 1) and ``--no-progress`` apply.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from swiftdp.bench.methods import DEFAULT_METHODS, METHODS, check_methods
from swiftdp.bench.models import EXTRA, GROUPS, HF_SUITE, SIZES, SUITE, describe, get_model
from swiftdp.bench.report import markdown_table, targets, targets_markdown, write_chart, write_json
from swiftdp.bench.runner import SuiteConfig, machine_info, run_suite
from swiftdp.errors import SwiftDPError

QUICK = {"steps": 3, "min_steps": 2, "warmup": 1, "batch_size": 8, "budget_s": 0.0}


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _models(text: str) -> tuple[str, ...]:
    """Model names, with group names (``default``, ``hf``) expanded, each name once."""
    names = [m for n in _names(text) for m in GROUPS.get(n, (n,))]
    return tuple(dict.fromkeys(names))


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``p``."""
    p.add_argument("--models", type=_models, default=SUITE,
                   help=f"comma-separated models from {', '.join(SUITE + EXTRA)}, or the "
                        f"Hugging Face rows {', '.join(HF_SUITE)} (need the [hf] extra; slow on "
                        "a CPU: batch 4, T=128), or groups: 'default' (the suite, the default) "
                        "and 'hf' (the four HF rows)")
    p.add_argument("--methods", type=_names, default=DEFAULT_METHODS,
                   help=f"comma-separated methods from {', '.join(METHODS)} (default: "
                        f"{', '.join(DEFAULT_METHODS)})")
    p.add_argument("--size", choices=(*SIZES, "tiny"), default="small",
                   help="model widths (the HF rows use their published configs at small and "
                        "medium; tiny, for tests, exists for them only)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default: each model's suite batch size)")
    p.add_argument("--steps", type=int, default=20, help="most timed steps per configuration")
    p.add_argument("--min-steps", type=int, default=5, help="fewest timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before measuring")
    p.add_argument("--budget-s", type=float, default=10.0,
                   help="seconds of timed steps per configuration (bounded by --min-steps and "
                        "--steps; 0 = always --steps)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in each worker (default: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="find the largest batch that fits, by doubling then bisection "
                        "(default: on with --device cuda; CUDA only)")
    p.add_argument("--quick", action="store_true",
                   help="few steps at batch 8 (smoke test; not a measurement)")
    p.add_argument("--out", type=Path, default=Path("bench_results"),
                   help="folder for results.json, chart.png and table.md (results.partial.jsonl "
                        "grows during the run and is removed at the end)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"),
                   default="passive",
                   help="OMP_WAIT_POLICY of the workers; passive (default) keeps timings sane "
                        "when other processes share the cores")
    p.add_argument("--timeout-s", type=float, default=900.0,
                   help="stop a configuration after this many seconds (reported failed)")
    p.add_argument("--nproc", type=_counts, default=None,
                   help="data-parallel scaling instead: comma-separated rank counts (e.g. 1,2), "
                        "non-private DDP against swiftdp under torchrun (gloo); --models "
                        "defaults to mlp,cnn,transformer, --threads (per rank) to 1")
    p.add_argument("--sweep", action="store_true",
                   help="the cost sweep instead: DP/non-private step time of a transformer and a "
                        "conv block over width d=128..1024, length T=64..1024 and batch 16..256, "
                        "shipped ghost-or-instantiate choice vs each side forced vs the flop "
                        "model; writes sweep.json, sweep.md, sweep.png to --out (about 10 min at "
                        "1 thread; --quick: seconds, tiny shapes; --threads defaults to 1)")
    return p


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _names(text))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``bench`` on the ``swiftdp`` command's subparsers; sets ``func=run``."""
    p = subparsers.add_parser(
        "bench", help="speed and memory vs non-private training and Opacus",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    """Check the options and build the :class:`SuiteConfig`.

    Raises:
        SwiftDPError: an unknown model or method, or a non-positive count.
    """
    for m in args.models:
        get_model(m, args.size)
    check_methods(list(args.methods))
    quick = QUICK if args.quick else {}
    batch = args.batch_size if args.batch_size is not None else quick.get("batch_size")
    for name, v in (("--batch-size", batch), ("--steps", args.steps),
                    ("--min-steps", args.min_steps)):
        if v is not None and v < 1:
            raise SwiftDPError(f"Expected {name} >= 1, got {v}.")
    return SuiteConfig(
        models=tuple(args.models), methods=tuple(args.methods), size=args.size,
        batch_size=int(batch) if batch is not None else None,
        steps=int(quick.get("steps", args.steps)),
        min_steps=int(quick.get("min_steps", args.min_steps)),
        warmup=int(quick.get("warmup", args.warmup)),
        budget_s=float(quick.get("budget_s", args.budget_s)),
        threads=args.threads, device=args.device,
        max_batch=args.device == "cuda" and args.max_batch is not False,
        timeout_s=args.timeout_s,
        omp_wait_policy="" if args.omp_wait_policy == "inherit" else args.omp_wait_policy,
    )


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the table and the target check, write JSON, PNG and markdown.

    Returns:
        0 on success (failed configurations are reported in the table), 2 on
        bad options or a missing GPU.
    """
    if getattr(args, "sweep", False):
        return run_sweep(args)
    if getattr(args, "nproc", None) is not None:
        return run_scaling(args)
    try:
        cfg = config_from_args(args)
    except SwiftDPError as exc:
        print(f"swiftdp: error: {exc}", file=sys.stderr)
        return 2
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("swiftdp: error: --device cuda, but torch sees no GPU; use --device cpu.",
              file=sys.stderr)
        return 2
    meta = machine_info(cfg.threads, cfg.device) | {
        "size": cfg.size, "quick": bool(args.quick), "config": cfg.__dict__,
        "models": {m: describe(m, cfg.size) for m in cfg.models},
    }
    out: Path = args.out
    partial = out / "results.partial.jsonl"
    partial.unlink(missing_ok=True)
    results = run_suite(cfg, progress=not args.no_progress, partial=partial)
    check = targets(results)
    table = markdown_table(results)
    head = (f"swiftdp bench — {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
            f"device {cfg.device}, size {cfg.size}")
    summary = targets_markdown(check)
    print(head + "\n\n" + table + "\n\n" + summary)
    write_json(out / "results.json", meta, results, check)
    write_chart(out / "chart.png", results, head)
    (out / "table.md").write_text(f"{head}\n\n{table}\n\n{summary}\n", encoding="utf-8")
    partial.unlink(missing_ok=True)  # results.json now holds everything
    print(f"\nwrote {out / 'results.json'}, {out / 'chart.png'}, {out / 'table.md'}")
    return 0


def run_scaling(args: argparse.Namespace) -> int:
    """``--nproc``: the data-parallel scaling benchmark (:mod:`swiftdp.bench.scaling`).

    Returns:
        0 when every run succeeded, 1 when one failed, 2 on bad options.
    """
    from swiftdp.bench import scaling

    quick = QUICK if args.quick else {}
    batch = args.batch_size if args.batch_size is not None else quick.get("batch_size")
    cfg = scaling.ScalingConfig(
        models=scaling.SCALING_MODELS if args.models == SUITE else tuple(args.models),
        nprocs=tuple(args.nproc), size=args.size,
        batch_size=int(batch) if batch is not None else None,
        steps=int(quick.get("steps", args.steps)), warmup=int(quick.get("warmup", args.warmup)),
        threads=args.threads or 1, timeout_s=args.timeout_s,
        omp_wait_policy="" if args.omp_wait_policy == "inherit" else args.omp_wait_policy,
    )
    prog = Path(sys.argv[0]).name
    prog = "python -m swiftdp.bench" if prog == "__main__.py" else prog
    return scaling.run_config(cfg, args.out, shlex.join([prog, *sys.argv[1:]]),
                              progress=not args.no_progress)


def run_sweep(args: argparse.Namespace) -> int:
    """``--sweep``: the cost sweep (:mod:`swiftdp.bench.sweep`).

    Returns:
        0 when every point ran or was skipped for its time budget, 1 when one failed.
    """
    from dataclasses import replace

    from swiftdp.bench import sweep

    cfg = replace(sweep.QUICK if args.quick else sweep.SweepConfig(), threads=args.threads or 1)
    prog = Path(sys.argv[0]).name
    prog = "python -m swiftdp.bench" if prog == "__main__.py" else prog
    rows = sweep.run(cfg, args.out, shlex.join([prog, *sys.argv[1:]]),
                     progress=not args.no_progress)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m swiftdp.bench [options]``."""
    parser = configure_parser(argparse.ArgumentParser(prog="swiftdp bench", description=__doc__))
    return run(parser.parse_args(argv))
