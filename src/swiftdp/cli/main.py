"""The ``swiftdp`` command: ``swiftdp train`` (the main job), ``swiftdp epsilon``, ``swiftdp audit``, ``swiftdp bench``.

Bad input (unknown option values, an unreadable data folder, an unreachable ε,
a resume folder that does not match) prints one line, ``swiftdp: error: ...``,
on stderr and exits with code 2, without a traceback (``swiftdp (rank R): error:
...`` in a process of a ``--nproc`` run). Ctrl-C during training
exits with code 130 and leaves the last complete epoch's checkpoint usable
with ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn

from swiftdp.errors import SwiftDPError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command-line syntax error (argparse's), reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``swiftdp`` parser with its subcommands."""
    from swiftdp.cli import audit, epsilon, train_command

    parser = _Parser(prog="swiftdp", description="Fast, exact differentially private training.")
    parser.add_argument("--version", action="version", version=_version())
    from swiftdp.bench import cli as bench_cli

    sub = parser.add_subparsers(dest="command", metavar="{train,epsilon,audit,bench}", parser_class=_Parser)
    train_command.add_parser(sub)
    epsilon.add_parser(sub)
    audit.add_parser(sub)
    bench_cli.add_parser(sub)
    return parser


def _version() -> str:
    import swiftdp

    return f"swiftdp {swiftdp.__version__}"


def _name() -> str:
    """``swiftdp``, or ``swiftdp (rank R)`` in a process that torchrun started among several."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world in (None, "1"):
        return "swiftdp"
    return f"swiftdp (rank {rank})"


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``swiftdp`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 on bad input, 130 when interrupted.
    """
    started = _process_start() if argv is None else time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # what ended torchrun's options, if it passed it on
        argv = argv[1:]
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP convergence notes
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            if args.command == "epsilon":
                from swiftdp.cli import epsilon

                return epsilon.run(args)
            if args.command == "audit":
                from swiftdp.cli import audit

                return audit.run(args)
            if args.command == "bench":
                from swiftdp.bench import cli as bench_cli

                return bench_cli.run(args)
            from swiftdp.cli import train_command

            return train_command.run(args, started, argv)
    except (UsageError, SwiftDPError) as e:
        print(f"{_name()}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{_name()}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{_name()}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _process_start() -> float:
    """When this process started (so the wall time includes Python and torch start-up)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil missing or unsupported platform
        return time.time()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    print(f"{_name()}: warning: {_one_line(message)}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
