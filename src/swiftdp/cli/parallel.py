"""``swiftdp train --nproc N``: the run, data-parallel on N local processes (gloo, CPU).

* **Launcher.** With ``--nproc N > 1`` the ``swiftdp train`` process checks the
  options, creates the run folder, and relaunches itself under ``torchrun``:
  ``python -m torch.distributed.run --standalone --nproc_per_node N -m
  swiftdp.cli -- train ...`` with the same arguments (plus ``--out`` the folder it
  created), each process using ``--threads`` CPU threads (default: the cores
  shared evenly, at least one each). It returns torchrun's exit code, or 130
  when interrupted (Ctrl-C is passed on to torchrun, which passes it on to the
  processes).
* **Workers.** A process that torchrun started among ``WORLD_SIZE > 1`` ranks
  joins the gloo process group (:func:`run_in_group`) and trains with
  :func:`swiftdp.make_private`, which is data-parallel in a process group
  (:mod:`swiftdp.distributed`): ``--batch-size`` stays the *global* expected
  batch size, each rank clips its share of one Poisson sample, the noise is
  added once in total, so σ, q, the steps and ε are those of the one-process
  run. Every rank saves and loads the checkpoints (collective); only rank 0
  prints and writes the rest of the run folder (:func:`on_rank0`). At the end
  every rank's ε is compared (:func:`check_same_epsilon`).
* **Faults.** A rank that fails makes every other rank fail at its next
  collective with a message naming the cause, so the run exits non-zero; the
  run folder's files are written atomically, so the last complete epoch's
  checkpoint stays usable with ``--resume`` (on any number of processes).

``torchrun --nproc_per_node N -m swiftdp.cli train ...`` run by hand works the
same (the workers take the world size from torchrun).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

import swiftdp
from swiftdp import distributed
from swiftdp.cli import rundir
from swiftdp.cli.options import TrainConfig, check_combination
from swiftdp.cli.setup import available_cores
from swiftdp.errors import InvalidArgumentError, SwiftDPError

T = TypeVar("T")

GROUP_TIMEOUT = timedelta(minutes=10)
"""How long a rank waits for the others in a collective (the process group's timeout)."""

TEARDOWN_TIMEOUT = timedelta(seconds=60)
"""How long a rank that finished waits for the others before leaving the group."""

EXIT_INTERRUPTED = 130


class RankFailedError(SwiftDPError):
    """Another rank of a ``--nproc`` run failed or disagrees; this one stops too."""


def world_from_env() -> int:
    """The number of ranks torchrun started this process among (1 outside torchrun).

    Raises:
        InvalidArgumentError: ``WORLD_SIZE`` is set but not a positive integer.
    """
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or "RANK" not in os.environ:
        return 1
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise InvalidArgumentError(
            f"WORLD_SIZE={raw!r} in the environment is not a number of processes >= 1; "
            "unset it, or launch with swiftdp train --nproc N.")
    return world


def is_main_rank() -> bool:
    """Whether this process prints and writes the run folder (rank 0, or no process group)."""
    return distributed.rank_and_world()[0] == 0


def worker_config(cfg: TrainConfig, requested: int | None, world: int) -> TrainConfig:
    """The configuration of one rank among ``world``: ``nproc`` is the world size.

    Args:
        cfg: the resolved options.
        requested: ``--nproc`` if it was given on the command line.
        world: the number of ranks torchrun started.

    Raises:
        InvalidArgumentError: ``--nproc`` differs from the number of ranks, or an
            option cannot run on several processes.
    """
    if requested is not None and requested != world:
        raise InvalidArgumentError(
            f"--nproc {requested}, but torchrun started {world} processes (WORLD_SIZE="
            f"{world}): drop --nproc when you launch torchrun yourself, or run swiftdp "
            f"train --nproc {requested} without torchrun.")
    cfg = replace(cfg, nproc=world)
    check_combination(cfg)
    return cfg


def threads_per_process(threads: int | None, nproc: int) -> int:
    """``--threads`` if given, else the cores this process may use shared among ``nproc``."""
    if threads is not None:
        return threads
    return max(1, available_cores() // nproc)


# -- inside a worker -----------------------------------------------------------------


def run_in_group(train: Callable[[], int]) -> int:
    """Join the gloo process group torchrun set up, run ``train``, leave the group.

    After a successful ``train`` the ranks meet at a barrier before the group
    is destroyed (a rank tearing gloo down while another is still in its last
    collective aborts the process). After a failure or an interruption the
    group is destroyed at once: the others fail at their next collective.

    Args:
        train: the run; returns the exit code.

    Returns:
        ``train``'s exit code.

    Raises:
        RankFailedError: a collective failed (another rank stopped or crashed).
    """
    try:
        # Restart-safe under torchrun --max-restarts (swiftdp.distributed).
        distributed.init_process_group("gloo", timeout=GROUP_TIMEOUT.total_seconds())
    except RuntimeError as e:
        raise RankFailedError(
            f"Could not join the process group of the other ranks within "
            f"{GROUP_TIMEOUT.total_seconds():g} s: {_first_line(e)}") from e
    code = 1
    try:
        code = train()
    except RuntimeError as e:
        if not _is_backend_error(e):
            raise
        raise RankFailedError(
            f"Rank {dist.get_rank()}: a collective failed, so another rank stopped or crashed "
            f"(see its message); the backend said: {_first_line(e)}") from e
    finally:
        try:
            if code == 0:
                dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT, wait_all_ranks=True)
        except RuntimeError:
            pass
        finally:
            dist.destroy_process_group()
    return code


def _is_backend_error(e: RuntimeError) -> bool:
    return isinstance(e, dist.DistError) or "gloo" in str(e).lower()


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and give its value to every rank (just ``fn()`` alone).

    Collective in a process group: every rank must call it. When ``fn``
    raises on rank 0, rank 0 raises its exception and every other rank a
    :class:`RankFailedError` saying so, so no rank is left waiting.

    Args:
        fn: rank 0's work (writing the run folder); its value must be picklable.
        what: the work, for the message (``"write metrics.json"``).

    Returns:
        ``fn()``'s value, on every rank.

    Raises:
        RankFailedError: ``fn`` failed on rank 0 (on the other ranks).
    """
    if not distributed.active():
        return fn()
    value: Any = None
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as e:  # re-raised below, once every rank knows
            error = e
    box: list[Any] = [value, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RankFailedError(f"Rank {dist.get_rank()}: rank 0 could not {what}, so every "
                              f"rank stops. Rank 0 said: {str(box[1])[:300]}")
    return box[0]  # type: ignore[no-any-return]


def sum_over_ranks(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (unchanged without a process group). Collective."""
    if not distributed.active():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [float(v) for v in total.tolist()]


def check_same_epsilon(epsilon: float) -> None:
    """Refuse a run whose ranks report different ε (their accountants must agree). Collective.

    Raises:
        RankFailedError: two ranks' ε differ.
    """
    if not distributed.active():
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, float(epsilon))
    for r, eps in enumerate(every):
        if eps != every[0]:
            raise RankFailedError(
                f"The ranks report different ε: rank 0 {every[0]!r}, rank {r} {eps!r}. Their "
                "accountants must hold the same history; this is a bug, please report it.")


# -- the launcher ----------------------------------------------------------------------


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The command that runs ``swiftdp <argv>`` on ``nproc`` processes under torchrun.

    ``--`` ends torchrun's options, so that none of ``argv`` is read as one
    of them (``--nproc`` as an abbreviation of ``--nproc-per-node``).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "swiftdp.cli", "--", *argv]


def launch(argv: Sequence[str], cfg: TrainConfig, run_dir: Path, created: bool) -> int:
    """Run ``swiftdp train`` on ``cfg.nproc`` processes under torchrun; returns its exit code.

    Args:
        argv: the command line (``["train", ...]``) of every process; it names
            ``run_dir`` (``--resume`` or ``--out``).
        cfg: the resolved options (``cfg.nproc > 1``).
        run_dir: the run folder.
        created: ``run_dir`` was created for this run: it is removed again if
            the processes leave it empty.

    Returns:
        torchrun's exit code (0 when every process succeeded), 130 when
        interrupted by Ctrl-C (SIGINT), 128 + the signal for another signal.
    """
    threads = threads_per_process(cfg.threads, cfg.nproc)
    source = str(Path(swiftdp.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": source if not path else source + os.pathsep + path}
    # Its own session: a terminal's Ctrl-C reaches this process only, which
    # passes it on to torchrun, which passes it on to every worker (so each
    # gets it once, not from the terminal and from torchrun too).
    proc = subprocess.Popen(torchrun_command(argv, cfg.nproc), env=env,
                            start_new_session=True)
    signum = _wait_forwarding_signals(proc)
    code = proc.returncode
    has_checkpoint = (run_dir / rundir.CHECKPOINT).is_file()
    resume = (f" The checkpoint of the last complete epoch in {run_dir} is intact; resume "
              f"with: swiftdp train --resume {run_dir} (add --nproc M for another number of "
              "processes).") if has_checkpoint else ""
    if created and not any(run_dir.iterdir()):
        run_dir.rmdir()
    if signum is not None:
        name = signal.Signals(signum).name
        print(f"swiftdp: interrupted ({name}); the {cfg.nproc} processes stopped.{resume}",
              file=sys.stderr)
        return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum
    if code != 0:
        print(f"swiftdp: error: the {cfg.nproc}-process run failed (torchrun exited with code "
              f"{code}); the failing rank's 'swiftdp' message is above.{resume}",
              file=sys.stderr)
    return code


def _wait_forwarding_signals(proc: subprocess.Popen[bytes]) -> int | None:
    """Wait for ``proc``, passing SIGINT and SIGTERM on to it; returns the first one received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        try:
            proc.wait()
        except KeyboardInterrupt:
            received.append(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            proc.wait()
        return received[0] if received else None

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return received[0] if received else None
