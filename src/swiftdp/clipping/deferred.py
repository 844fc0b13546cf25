"""Warnings whose count lives on the device, read without stalling it.

On a CPU a value computed by the step can be read at once: the kernels have
run. On an accelerator, reading it (``.item()``, ``bool()``, Python branching
on a tensor) makes the host wait for every kernel queued so far, which stops
it from queueing the rest of the step ahead of the device. So in a step the
engine runs without host synchronisation (:attr:`GradClipper.sync_free`,
on by default off the CPU), an example with a non-finite gradient norm is
dropped by masking on the device — the mask is formed and applied every step,
whether or not anything is off — and the count for the warning is copied to
pinned host memory asynchronously, to be read once the device has written
it: the warning of a step arrives at a later step (or when the clipper is
removed), never with a wait in between.

What this defers is a warning only: the example is left out of the clipped
sum in the same step either way (the privacy guarantee does not depend on
the warning).
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import torch
from torch import Tensor

from swiftdp.errors import NonFiniteGradientWarning


def nonfinite_message(k: int, n: int, when: str = "this step") -> str:
    """The warning for ``k`` of ``n`` examples with a non-finite gradient norm."""
    return (
        f"{k} of {n} examples of {when} had a non-finite per-example gradient "
        "norm (NaN, inf, or beyond the float range) and were dropped from the "
        "clipped sum: clip factor 0, contribution left out exactly, the other "
        "examples unchanged. Look for NaN/inf or extreme values in those inputs "
        "or targets (e.g. `torch.isfinite(x).all()`), or a diverging model."
    )


def to_host_async(t: Tensor) -> tuple[Tensor, Any]:
    """Start copying ``t`` to the host without waiting: ``(host tensor, event or None)``.

    On CUDA the copy goes to pinned memory behind an event recorded on the
    current stream (read the host tensor after ``event.synchronize()``,
    which waits for the work queued before ``t``'s copy only, never for what
    is queued after it). Elsewhere ``t`` itself is returned.
    """
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def read_host(host: Tensor, event: Any) -> Any:
    """The value of a copy started by :func:`to_host_async` (waits for that copy only)."""
    if event is not None:
        event.synchronize()
    return host.tolist()  # host memory: not an op, no device synchronisation


class PendingCounts:
    """Counts of dropped examples, one per step, read once the device has them."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Tensor, Any, int, int]] = deque()
        self._steps = 0

    def push(self, bad: Tensor) -> None:
        """Queue the count of ``bad`` (a ``(B,)`` bool mask) without reading it."""
        self._steps += 1
        host, event = to_host_async(bad.sum())
        self._queue.append((host, event, int(bad.numel()), self._steps))

    def poll(self, *, wait: bool = False) -> None:
        """Warn for every count the device has written (all of them if ``wait``).

        Warns:
            NonFiniteGradientWarning: for each step that dropped examples.
        """
        while self._queue:
            host, event, n, step = self._queue[0]
            if not wait and event is not None and not event.query():
                return
            self._queue.popleft()
            k = int(read_host(host, event))
            if k:
                warnings.warn(NonFiniteGradientWarning(
                    nonfinite_message(k, n, f"sync-free step {step} (counted on the device, "
                                            "reported when it was read)")), stacklevel=3)
