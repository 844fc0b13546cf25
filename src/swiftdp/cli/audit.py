"""``swiftdp audit``: a one-run empirical lower bound on ε of the real pipeline.

Trains once through ``make_private`` with ``--canaries`` gradient canaries,
each included with probability ½, and prints the lower bound on ε the
canaries' scores prove beside the accountant's ε for the same run
(:func:`swiftdp.audit.one_run`)::

    swiftdp audit --canaries 1000 --sample-rate 1 --steps 1 --noise-multiplier 2
    swiftdp audit --fault noise:0.3          # a known bug: the bound must exceed the claim
    swiftdp audit --runs 200 --fault realised-batch   # a count leak: many runs, one canary each

``--out DIR`` writes ``audit.json`` (every figure and the scores) and
``audit.png`` (the score distributions of included and excluded canaries).
The exit code is 1 when a bound exceeds the claimed ε (a privacy bug at the
confidence), 0 otherwise. ``--runs R`` audits ``R`` independent runs
with one canary each instead (:func:`swiftdp.audit.many_runs`; ``--score
scale`` by default, which reads the update's divisor: the audit for leaks of
a count). ``--fault`` injects one of
:mod:`swiftdp.audit.faults` (test-only) to check the audit's power.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from swiftdp.audit import faults
from swiftdp.audit.many_runs import SCORES, many_runs
from swiftdp.audit.one_run import OneRunAudit, one_run
from swiftdp.errors import InvalidArgumentError

FAULTS: dict[str, Callable[[float | None], AbstractContextManager[None]]] = {
    "none": lambda f: contextlib.nullcontext(),
    "clipping-off": lambda f: faults.clipping_disabled(),
    "noise": lambda f: faults.noise_scaled(0.3 if f is None else f),
    "physical-noise": lambda f: faults.noise_per_physical_batch(),
    "realised-batch": lambda f: faults.realised_batch_division(),
    "sampling": lambda f: faults.sampling_rate_scaled(2.0 if f is None else f),
    "sigma": lambda f: faults.sigma_unreported(0.3 if f is None else f),
}


XLABELS = {
    "direction": "canary score (movement along its direction, units of C/(qN))",
    "scale": "run score (-log of the spare parameters' spread: the divisor)",
    "input": "canary score (log-probability of its label on the trained model)",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Declare the ``audit`` subcommand's options."""
    p: argparse.ArgumentParser = sub.add_parser(
        "audit", help="one-run empirical lower bound on ε (Steinke et al. 2023)",
        description="Train once through make_private with gradient canaries and print the "
                    "lower bound on ε their scores prove, beside the accountant's ε.")
    p.add_argument("--canaries", type=int, default=1000, help="m canaries (default 1000)")
    p.add_argument("--fillers", type=int, default=None,
                   help="ordinary examples (default 1000; with --runs, 1 per run)")
    p.add_argument("--runs", type=int, default=1,
                   help="independent runs, one canary each (default 1: one run, --canaries)")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="what --runs scores: scale (default: the update's divisor) or "
                        "direction (the canary's direction, as one run scores)")
    p.add_argument("--spare", type=int, default=1000,
                   help="with --runs: parameters no example touches (default 1000)")
    p.add_argument("--steps", type=int, default=1, help="logical steps (default 1)")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Poisson rate q (default 1)")
    p.add_argument("--noise-multiplier", "--sigma", type=float, default=2.0, dest="sigma",
                   help="σ (default 2)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="C (default 1)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the bound (default 0.95)")
    p.add_argument("--mode", default="bk", help="clipping engine mode (default bk)")
    p.add_argument("--max-physical-batch-size", type=int, default=None,
                   help="physical chunks (default: none)")
    p.add_argument("--fault", default="none", metavar="KIND[:FACTOR]",
                   help=f"test-only bug to inject: {', '.join(FAULTS)} (noise:F, sampling:F, "
                        "sigma:F take a factor)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: OS entropy)")
    p.add_argument("--out", type=Path, default=None, help="folder for audit.json and audit.png")
    return p


def parse_fault(text: str) -> tuple[str, float | None]:
    """``KIND[:FACTOR]`` → ``(kind, factor)``.

    Raises:
        InvalidArgumentError: an unknown kind or a factor that is not a positive number.
    """
    kind, _, factor = text.partition(":")
    if kind not in FAULTS:
        raise InvalidArgumentError(
            f"--fault {text!r}: expected one of {', '.join(FAULTS)} (with :FACTOR for noise, "
            "sampling, sigma).")
    if not factor:
        return kind, None
    try:
        value = float(factor)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidArgumentError(f"--fault {text!r}: FACTOR must be a number > 0.")
    return kind, value


def run(args: argparse.Namespace) -> int:
    """Run the audit; print it; 1 when a bound exceeds the claimed ε."""
    kind, factor = parse_fault(args.fault)
    if args.runs < 1:
        raise InvalidArgumentError(f"--runs {args.runs}: expected a count >= 1.")
    if args.runs == 1 and args.score is not None:
        raise InvalidArgumentError(
            "--score applies to --runs R (R > 1): one run scores each canary's direction.")
    if args.runs > 1:
        with FAULTS[kind](factor):
            result = many_runs(
                runs=args.runs, fillers=1 if args.fillers is None else args.fillers,
                spare=args.spare, steps=args.steps, sample_rate=args.sample_rate,
                noise_multiplier=args.sigma, max_grad_norm=args.max_grad_norm,
                delta=args.delta, confidence=args.confidence, mode=args.mode,
                max_physical_batch_size=args.max_physical_batch_size,
                score=args.score or "scale", seed=args.seed)
        print(report(result, args.fault))
        if args.out is not None:
            write(result, args.out, args.fault)
        return 1 if result.violated else 0
    if args.fillers is None:
        args.fillers = 1000
    with FAULTS[kind](factor):
        result = one_run(
            canaries=args.canaries, fillers=args.fillers, steps=args.steps,
            sample_rate=args.sample_rate, noise_multiplier=args.sigma,
            max_grad_norm=args.max_grad_norm, delta=args.delta, confidence=args.confidence,
            mode=args.mode, max_physical_batch_size=args.max_physical_batch_size, seed=args.seed)
    print(report(result, args.fault))
    if args.out is not None:
        write(result, args.out, args.fault)
    return 1 if result.violated else 0


def report(r: OneRunAudit, fault: str = "none") -> str:
    """The audit in a few lines."""
    verdict = ("VIOLATED: a lower bound exceeds the claimed ε" if r.violated
               else "consistent: no bound exceeds the claimed ε")
    power = ("" if r.ceiling_fdp > r.epsilon_claimed else
             f" (these {r.canaries} {'canaries' if r.runs == 1 else 'runs'} cannot show more "
             f"than ε = {r.ceiling_fdp:.3f}, below the claim: add "
             f"{'canaries' if r.runs == 1 else 'runs'} to give the audit power)")
    return "\n".join([
        f"claimed ε          {r.epsilon_claimed:.4f} (δ = {r.delta:g}; σ = {r.noise_multiplier:g}, "
        f"q = {r.sample_rate:.4g}, {r.steps} steps)",
        f"lower bound (ε, δ) {r.epsilon_lower_bound:.4f} (Steinke et al. 2023)",
        f"lower bound f-DP   {r.epsilon_lower_bound_fdp:.4f} (Mahloujifar et al. 2025; "
        f"{r.correct} of {r.guesses} guesses right, {r.confidence:.0%} confidence)",
        f"ceiling            {r.ceiling_fdp:.4f} (every guess right){power}",
        (f"canaries           {r.canaries} ({r.included} included)" if r.runs == 1 else
         f"runs               {r.runs}, one canary each ({r.included} included; "
         f"score: {r.score})")
        + ("" if fault == "none" else f"; fault injected: {fault}"),
        f"verdict            {verdict}",
    ])


def _finite(v: Any) -> Any:
    """JSON-safe: a non-finite number becomes ``None`` (no claim, not recorded)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def write(r: OneRunAudit, out: Path, fault: str = "none", name: str = "audit") -> None:
    """``{name}.json`` and ``{name}.png`` (``audit`` by default) in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"fault": fault, **r.to_dict()}
    (out / f"{name}.json").write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    bins = 40
    ax.hist(r.out_scores, bins=bins, alpha=0.6, label=f"excluded ({len(r.out_scores)})")
    ax.hist(r.in_scores, bins=bins, alpha=0.6, label=f"included ({len(r.in_scores)})")
    ax.set_xlabel(XLABELS.get(r.score, r.score))
    ax.set_ylabel("canaries")
    ax.set_title(f"claimed ε {r.epsilon_claimed:.2f}, lower bound {r.epsilon_lower_bound_fdp:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png")
    plt.close(fig)
