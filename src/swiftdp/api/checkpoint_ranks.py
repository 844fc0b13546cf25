"""Checkpoints of a data-parallel run: one file for all ranks, resumable on any number of them.

:func:`swiftdp.api.checkpoint.save` and :func:`~swiftdp.api.checkpoint.load`
are collective in a process group (every rank calls them):

* **Saving.** The ranks meet (a named rendezvous), check they are at the same
  step, and send rank 0 their noise generator states (seeded mode only; a
  secure generator's state never leaves its process). Rank 0 writes the one
  file atomically. A failure on any rank (a bad ``extra``, a full disk) is
  raised on every rank, so none is left waiting.
* **Loading.** Every rank reads the file (it must be on a file system every
  rank sees) and checks that all read the same bytes (SHA-256). The model,
  optimizer, accountant and sampler states are the same on every rank.
* **Noise streams.** On as many ranks as wrote the file, each rank continues
  its own saved stream, bit for bit. On another number of ranks, each rank
  derives a fresh stream from the saved states, the new world size and its
  rank (SHA-256): no stream of the saved run is continued by two ranks or
  replayed, which would correlate the noise of different steps or ranks. A
  secure run reseeds every rank from OS entropy, as in one process.
* **Sampling.** Every rank draws the same Poisson mask over the whole
  dataset and keeps its share (:mod:`swiftdp.distributed`), so the saved
  sampler state is every rank's; it continues the same sample with the same
  ``q`` on any number of ranks. A secure run's fresh sampling randomness is
  drawn by rank 0 and broadcast, so the ranks keep drawing the same mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from swiftdp import distributed
from swiftdp.errors import CheckpointError

T = TypeVar("T")


def together(ranks: distributed.Ranks | None, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    Args:
        ranks: the process group, or ``None`` (then just ``fn()``).
        what: the operation, for the message (``"save_checkpoint"``).
        fn: this rank's part.

    Returns:
        ``fn()``'s value on this rank.

    Raises:
        Exception: ``fn``'s own exception on the rank where it was raised;
            :class:`CheckpointError` naming that rank on the others.
    """
    if ranks is None:
        return fn()
    error: Exception | None = None
    value: Any = None
    try:
        value = fn()
    except Exception as e:  # re-raised below, after every rank knows
        error = e
    failures = distributed.gather_objects(
        None if error is None else f"{type(error).__name__}: {error}", ranks.control)
    if error is not None:
        raise error
    for r, message in enumerate(failures):
        if message is not None:
            raise CheckpointError(
                f"Rank {ranks.rank}: {what} failed on rank {r}, so it did not happen on any "
                f"rank (the run is unchanged here). Rank {r} said: {str(message)[:400]}")
    return value  # type: ignore[no-any-return]


def gather_noise_states(ranks: distributed.Ranks | None,
                        state: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Every rank's noise generator state in rank order (``None`` for a secure run)."""
    if ranks is None:
        return None if state is None else [state]
    states = distributed.gather_objects(state, ranks.control)
    if any(s is None for s in states):
        return None
    return [torch.as_tensor(s) for s in states]


def noise_state_for(ranks: distributed.Ranks | None, saved: list[torch.Tensor],
                    steps_taken: int) -> tuple[torch.Tensor | None, int | None]:
    """The state or the seed this rank's noise generator continues from.

    Args:
        ranks: the process group now (``None``: one process).
        saved: the saved run's states, one per rank that wrote the checkpoint.
        steps_taken: the steps the checkpoint records.

    Returns:
        ``(state, None)`` to continue a saved stream (as many ranks now as
        then), or ``(None, seed)`` for a fresh stream derived from all saved
        states, the world size now and this rank.
    """
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    if len(saved) == world:
        return saved[rank], None
    digest = hashlib.sha256()
    for s in saved:
        digest.update(s.numpy().tobytes())
    digest.update(f"swiftdp-resume|{len(saved)}->{world}|rank {rank}|step {steps_taken}".encode())
    return None, int.from_bytes(digest.digest()[:8], "little") >> 1


def check_same_file(ranks: distributed.Ranks | None, path: str, sha256: str) -> None:
    """Refuse a load whose ranks read different files at ``path``."""
    if ranks is None:
        return
    digests = distributed.gather_objects(sha256, ranks.control)
    for r, d in enumerate(digests):
        if d != digests[0]:
            raise CheckpointError(
                f"Checkpoint `{path}` differs between rank 0 and rank {r} (SHA-256 "
                f"{digests[0][:12]}... vs {d[:12]}...): every rank must load the same file. Put "
                "checkpoints on a file system every rank sees, or copy rank 0's file to each.")


def shared_generator_state(ranks: distributed.Ranks | None, generator: torch.Generator) -> None:
    """Give every rank rank 0's ``generator`` state (in place); nothing without ranks."""
    if ranks is None:
        return
    state = generator.get_state()
    dist.broadcast(state, src=0, group=ranks.control)
    generator.set_state(state)
