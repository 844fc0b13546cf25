"""``swiftdp epsilon``: plan a run's privacy with the accountant that training uses.

ε for (σ, sampling, length, δ), or σ for a target ε::

    swiftdp epsilon --sigma 1.1 --batch-size 256 --dataset-size 60000 --epochs 60
    swiftdp epsilon --target-epsilon 3 --batch-size 256 --dataset-size 60000 --epochs 60

The sampling rate is ``--sample-rate`` q, or ``--batch-size / --dataset-size``;
the length is ``--steps``, or ``--epochs`` (steps = epochs / q, rounded up,
counted exactly by :func:`swiftdp.accounting.steps_for_epochs`).
"""

from __future__ import annotations

import argparse

from swiftdp.accounting import (
    MECHANISMS,
    PrivacyAccountant,
    get_noise_multiplier,
    steps_for_epochs,
)
from swiftdp.errors import InvalidArgumentError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Declare the ``epsilon`` subcommand's options."""
    p: argparse.ArgumentParser = sub.add_parser(
        "epsilon", help="ε for a planned run, or σ for a target ε",
        description="ε for (σ, sampling rate, length, δ), or σ for a target ε "
                    "(the accountant used by training).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma", "--noise-multiplier", type=float, dest="sigma",
                      help="noise multiplier σ: print ε")
    what.add_argument("--target-epsilon", type=float, help="target ε: print the σ that meets it")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--batch-size", type=int, help="expected batch size (with --dataset-size)")
    rate.add_argument("--sample-rate", type=float, help="Poisson sampling rate q")
    p.add_argument("--dataset-size", type=int, help="number of training examples N")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=float, help="passes over the data")
    length.add_argument("--steps", type=int, help="number of DP-SGD steps")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--accountant", choices=MECHANISMS, default="pld",
                   help="accountant (default pld)")
    return p


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.dataset_size is not None:
            raise InvalidArgumentError("Give --dataset-size only with --batch-size, not with --sample-rate.")
        return float(args.sample_rate)
    if args.dataset_size is None:
        raise InvalidArgumentError(
            "--batch-size needs --dataset-size N (the sampling rate is batch size / N)."
        )
    if args.dataset_size < 1 or args.batch_size < 1 or args.batch_size > args.dataset_size:
        raise InvalidArgumentError(
            f"Expected 1 <= --batch-size <= --dataset-size, got {args.batch_size} and "
            f"{args.dataset_size}."
        )
    return args.batch_size / args.dataset_size


def run(args: argparse.Namespace) -> int:
    """Print ε (or σ) and the inputs it was computed from; returns the exit code."""
    q = _sample_rate(args)
    if args.steps is not None:
        if args.steps < 1:
            raise InvalidArgumentError(f"Expected --steps >= 1, got {args.steps}.")
        steps = args.steps
    else:
        steps = steps_for_epochs(args.epochs, q)
    if args.target_epsilon is not None:
        sigma = get_noise_multiplier(args.target_epsilon, args.delta, q, steps=steps,
                                     mechanism=args.accountant)
        acct = PrivacyAccountant(args.accountant)
        acct.step(sigma, q, steps)
        lines = [("sigma", f"{sigma:.6f}"), ("epsilon", f"{acct.epsilon(args.delta):.6f}")]
    else:
        acct = PrivacyAccountant(args.accountant)
        acct.step(args.sigma, q, steps)
        lines = [("epsilon", f"{acct.epsilon(args.delta):.6f}"), ("sigma", f"{args.sigma:g}")]
    lines += [("delta", f"{args.delta:g}"), ("sample rate", f"{q:.6g}"), ("steps", str(steps)),
              ("accountant", args.accountant)]
    for key, value in lines:
        print(f"{key:<12} {value}")
    return 0
