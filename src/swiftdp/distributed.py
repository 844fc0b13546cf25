"""Data-parallel DP-SGD on ``torch.distributed``: the process group as swiftdp sees it.

When a process group is initialised (``torchrun``, then
``torch.distributed.init_process_group``) with more than one rank,
:func:`swiftdp.make_private` trains data-parallel with the same signature:

* **Sampling.** Every rank draws the same Poisson mask over the whole
  dataset (one sampling seed, shared from rank 0) and keeps the examples
  ``i`` with ``i % world_size == rank``: the union of the ranks' batches is
  exactly the single-process Poisson sample with rate ``q = batch_size / N``
  (``batch_size`` of the loader is the *global* expected batch size), and
  the ranks' batches are disjoint. The stream does not depend on the number
  of ranks, so a run resumes on any number of them.
* **Noise once.** Each rank adds ``N(0, σ²C²/W)`` to its clipped sum from its
  own generator (independent: without ``seed=``, or with ``secure=True``,
  each from the operating system's entropy), then one all-reduce sums them:
  the total noise has variance ``σ²C²``, and no rank knows it (with ``seed=``
  the run is reproducible, so every stream can be recomputed). The sum is
  divided by the global expected batch size ``q·N``.
* **Checked.** ``make_private`` refuses ranks that disagree on the model's
  parameters and buffers (names, shapes, dtypes), the dataset (fingerprint),
  σ, the planned steps, ``secure``, the mode, the loss reduction, the clipping
  or physical batching; every ``step()`` refuses ranks at different logical
  steps or with different σ (``set_noise_multiplier`` on one rank only).
* **Identical parameters.** The model's parameters and buffers are broadcast
  from rank 0 by ``make_private``; every rank then applies the same
  all-reduced gradient.
* **Faults.** ``make_private``, every ``step()`` and every checkpoint begin with
  a monitored barrier (:meth:`Ranks.rendezvous`, on a gloo group, also under
  NCCL): a rank that crashed, or does not arrive within ``timeout`` seconds
  (hangs, skipped a step, or did not call a collective method), makes every
  other rank raise :class:`~swiftdp.errors.StepStructureError` naming it,
  never a silent hang. Nothing of that step is applied; the last checkpoint
  stays usable (files are written atomically).
* **Checkpoints** (:mod:`swiftdp.api.checkpoint`) are collective: every rank
  calls ``save_checkpoint``; rank 0 writes one file holding every rank's noise
  generator state (seeded mode). ``load_checkpoint`` on the same number of
  ranks restores each rank's own stream; on another number of ranks every
  rank derives a fresh stream (no rank's stream is ever replayed or shared).
  The sampling stream does not depend on the number of ranks, so the run
  continues the same Poisson sample with the same ``q`` and its ε exactly.

Per-example norms never leave a rank: each clips its own examples.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from swiftdp.errors import InvalidArgumentError, StepStructureError


@contextmanager
def step_collective() -> Iterator[None]:
    """A collective of ``optimizer.step()``: a peer that left or crashed is a clear error.

    Raises:
        StepStructureError: the collective failed (another rank stopped, crashed,
            or is not at this step), with the backend's message.
    """
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, StepStructureError):
            raise
        raise StepStructureError(
            f"Rank {dist.get_rank()}: a collective of optimizer.step() failed, so another "
            "rank stopped, crashed or is not at this step (e.g. it skipped a batch of "
            "dp.data_loader, or raised): every rank must call optimizer.step() once per "
            "batch, empty batches included. Nothing was applied on this rank for this step; "
            f"the backend said: {str(e)[:300]}") from e


DEBUG_ENV = "SWIFTDP_DEBUG_DISTRIBUTED"
"""Set to ``1``: every step checks that the parameters are identical on all ranks."""

DEFAULT_TIMEOUT = 600.0
"""Seconds a rank waits for the others at a rendezvous before raising (``make_private(timeout=)``)."""


@dataclass(frozen=True)
class Ranks:
    """The process group of a data-parallel run, fixed when ``make_private`` ran.

    Attributes:
        rank: this process' rank.
        world: the number of ranks.
        timeout: seconds to wait for every rank at a rendezvous.
        control: the gloo group the rendezvous runs on (the default group
            when it is gloo; a gloo group beside an NCCL one otherwise).
    """

    rank: int
    world: int
    timeout: float
    control: Any
    debug: bool = False

    def check_identical(self, tensors: list[Any], when: str) -> None:
        """Debug mode: refuse ranks whose ``tensors`` (the parameters) are not bitwise equal.

        A cheap checksum per tensor (its float64 sum and sum of squares) is
        compared across the ranks: one small all-gather per step.

        Raises:
            StepStructureError: naming the first tensor and rank that differ.
        """
        mine = torch.tensor([[float(t.detach().double().sum()),
                              float(t.detach().double().square().sum())] for t in tensors],
                            dtype=torch.float64).reshape(-1, 2)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.control)
        for r, theirs in enumerate(gathered):
            differs = (theirs != gathered[0]).any(dim=1).nonzero().flatten().tolist()
            if differs:
                raise StepStructureError(
                    f"Debug mode ({DEBUG_ENV}=1): {when}, rank {r}'s parameters differ from "
                    f"rank 0's (first at parameter {differs[0]} in the optimizer's order, "
                    f"{len(differs)} in all). A rank changed its parameters outside "
                    "optimizer.step() or loaded other weights; this step's update was already "
                    "applied on every rank, so stop here and resume every rank from the same "
                    "checkpoint.")

    def rendezvous(self, what: str) -> None:
        """Wait until every rank has reached ``what``; a missing rank is named.

        Rank 0 hears from each rank, up to :attr:`timeout` seconds, and names
        every one that did not answer; the others wait for rank 0.

        Args:
            what: what every rank must reach (``"optimizer.step() of logical step 3"``).

        Raises:
            StepStructureError: a rank crashed, hangs, or is elsewhere in its
                program; the message names it and says what to look for.
        """
        try:
            dist.monitored_barrier(group=self.control, timeout=timedelta(seconds=self.timeout),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            text = str(e)
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
            if found is not None:
                missing = [int(r) for r in found.group(1).replace(" ", "").split(",") if r]
                who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
            else:
                missing, who = [0], "rank 0"
            raise StepStructureError(
                f"Rank {self.rank}: {who} did not reach {what} within {self.timeout:g} s: "
                f"{'it' if len(missing) == 1 else 'they'} crashed, hang, or skipped this "
                "collective (every rank must call make_private, optimizer.step() for every "
                "batch of dp.data_loader, save_checkpoint and load_checkpoint together). "
                f"See {who}'s log. Nothing was applied on this rank for this call; the "
                "last checkpoint is intact. Raise make_private(timeout=) if the ranks are "
                f"only slow. The backend said: {text[:300]}") from e
        # Every rank arrived: at the same call? (`if rank == 0: save_checkpoint()` would
        # otherwise pair rank 0's checkpoint with the others' next step.)
        labels = gather_objects(what, self.control)
        if any(label != labels[0] for label in labels):
            where = "; ".join(f"rank {r}: {label}" for r, label in enumerate(labels))
            raise StepStructureError(
                f"Rank {self.rank}: the ranks reached different collective calls ({where}). "
                "Every rank must call make_private, optimizer.step() for every batch of "
                "dp.data_loader, save_checkpoint and load_checkpoint together, in the same "
                "order (not only on rank 0). Nothing was applied for this call.")


def init_process_group(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment, restart-safe.

    Under ``torchrun --max-restarts N`` the workers of a restarted attempt
    must not read the keys the failed attempt left in the rendezvous store
    (with torch 2.13 a restarted gloo group otherwise fails in
    ``connectFullMesh``, "Connection refused", connecting to a dead worker's
    address). This opens torchrun's store itself and prefixes it with the
    attempt (``TORCHELASTIC_RESTART_COUNT``); everything else is torch's own.
    Outside torchrun's elastic agent it calls ``init_process_group`` as is.

    Args:
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for torch's default (NCCL
            with CUDA, gloo otherwise).
        timeout: the process group's own timeout, in seconds.
    """
    env = os.environ
    wait = timedelta(seconds=timeout)
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        dist.init_process_group(backend, timeout=wait)
        return
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=wait)
    dist.init_process_group(
        backend, timeout=wait, rank=rank, world_size=world,
        store=dist.PrefixStore(f"swiftdp-attempt-{env['TORCHELASTIC_RESTART_COUNT']}", store))


def make_ranks(timeout: float) -> Ranks | None:
    """The :class:`Ranks` of the current process group, or ``None`` without one.

    Collective: every rank must call it (it may create the gloo control group).

    Raises:
        InvalidArgumentError: ``timeout`` is not a positive number of seconds.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgumentError(
            f"Expected timeout > 0 seconds, got {timeout!r}: how long a rank waits for the "
            f"others at each collective before raising (default {DEFAULT_TIMEOUT:g}).")
    if not active():
        return None
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), float(timeout), control,
                 debug=os.environ.get(DEBUG_ENV) == "1")


def gather_objects(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank of ``group``."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shared_seed(seed: int | None, group: Any = None) -> int:
    """The same seed on every rank: ``seed``, or a secret one drawn by rank 0.

    Raises:
        InvalidArgumentError: ranks passed different seeds.
    """
    mine = torch.tensor([secrets.randbits(62) if seed is None else int(seed),
                         0 if seed is None else 1], dtype=torch.int64)
    got = mine.clone()
    dist.broadcast(got, src=0, group=group)
    if seed is not None and (int(got[1]) != 1 or int(got[0]) != int(seed)):
        raise InvalidArgumentError(
            f"make_private got seed={seed!r} on rank {dist.get_rank()} but another seed on "
            "rank 0: pass the same seed on every rank (or none).")
    return int(got[0])


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def check_same(values: list[float], what: str,
               error: type[Exception] = InvalidArgumentError, fix: str = "",
               group: Any = None) -> None:
    """Refuse a run whose ranks disagree on ``values`` (dataset size, batch size, ...).

    Every rank takes part and sees every rank's values, so all of them raise
    together (none is left waiting in a later collective).
    """
    mine = torch.tensor(values, dtype=torch.float64)
    world = dist.get_world_size()
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    for r, g in enumerate(gathered):
        if not torch.equal(g, gathered[0]):
            raise error(
                f"The ranks disagree on {what}: rank 0 has {gathered[0].tolist()}, rank {r} "
                f"has {g.tolist()}. " + (fix or "Every rank must pass the same model, "
                                         "dataset and privacy arguments to make_private."))


def check_same_objects(values: dict[str, Any], error: type[Exception] = InvalidArgumentError,
                       group: Any = None) -> None:
    """:func:`check_same` for any picklable values (names, shapes, flags, fingerprints)."""
    world = dist.get_world_size()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, values, group=group)
    for r, g in enumerate(gathered):
        for key, v in g.items():
            if v != gathered[0].get(key):
                raise error(
                    f"The ranks disagree on {key}: rank 0 has {_short(gathered[0].get(key))}, "
                    f"rank {r} has {_short(v)}. Every rank must pass the same model, dataset "
                    "and privacy arguments to make_private.")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 200 else text[:200] + "..."


BUCKET_BYTES = 25 * 2**20
"""Size of the buckets :func:`noisy_all_reduce` sends (DDP's default bucket size)."""


def noisy_all_reduce(accumulators: list[Any], add_noise: Callable[[list[Any]], None]) -> None:
    """Add this rank's noise share and sum over the ranks, bucket by bucket, in place.

    The parameters' sums are cut into consecutive buckets of about
    :data:`BUCKET_BYTES` (one dtype and device each). Each bucket gets its
    noise share first, then its all-reduce starts asynchronously, so drawing
    the next bucket's noise overlaps the previous bucket's communication. The
    noise is drawn in the parameters' order, as in one process; no bucket is
    sent before its noise is in it.

    Args:
        accumulators: objects with a ``grad`` tensor (the clipped sums), in
            the same order on every rank.
        add_noise: adds this rank's noise share to a bucket's accumulators.
    """
    pending = []
    for bucket in _buckets(accumulators):
        add_noise(bucket)
        flat = torch.cat([a.grad.reshape(-1) for a in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
    for bucket, flat, work in pending:
        assert work is not None
        work.wait()
        offset = 0
        for a in bucket:
            n = a.grad.numel()
            a.grad.copy_(flat[offset:offset + n].view_as(a.grad))
            offset += n


def _buckets(accumulators: list[Any]) -> Iterator[list[Any]]:
    bucket: list[Any] = []
    size = 0
    for a in accumulators:
        kind = (a.grad.dtype, a.grad.device)
        if bucket and (size >= BUCKET_BYTES or (bucket[0].grad.dtype,
                                                bucket[0].grad.device) != kind):
            yield bucket
            bucket, size = [], 0
        bucket.append(a)
        size += a.grad.numel() * a.grad.element_size()
    if bucket:
        yield bucket


def exit_process(code: int) -> NoReturn:
    """End a worker process now, once its group is destroyed, skipping interpreter teardown.

    With torch 2.13, a gloo rank that has destroyed its process group can
    still abort while Python finalises (``terminate called without an active
    exception``, about 1 run in 25 on 2 busy cores; freeing the training
    objects first avoided it in 90 runs): gloo's threads may still hold
    tensors that then die without the interpreter. Everything is written and
    flushed by then, so the worker leaves with its exit code instead.

    Args:
        code: the exit status.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
