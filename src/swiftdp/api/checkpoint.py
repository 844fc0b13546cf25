"""Atomic, validated checkpoints of a private training run.

A checkpoint holds the model, the optimizer (with the noise generator), the
accountant's history, the sampler's position and the privacy settings. It
is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so a crash never leaves a half-written file; a
corrupt file or one from a different run is refused with
:class:`~swiftdp.errors.CheckpointError`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from swiftdp.errors import CheckpointError

if TYPE_CHECKING:
    from swiftdp.api.private import PrivateTraining

FORMAT = "swiftdp-checkpoint"
VERSION = 1
_MATCH_KEYS = ("noise_multiplier", "max_grad_norm", "delta", "sample_rate",
               "expected_batch_size", "clipping", "poisson_sampling", "accountant")


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Run ``write`` on a temporary file in ``path``'s folder, fsync, rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a
    half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save(run: PrivateTraining, path: Path, extra: dict[str, Any]) -> None:
    """Write ``run``'s complete state to ``path`` atomically."""
    loader = run.data_loader.loader
    sampler = getattr(loader, "poisson_sampler", None)
    sampler_state = None
    if sampler is not None:
        sampler_state = sampler.state_dict(steps_consumed=run.data_loader.steps_in_epoch)
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "privacy": run.privacy.to_dict(),
        "num_samples": run.num_samples,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "accountant": run.accountant.state_dict(),
        "sampler": sampler_state,
        "extra": extra,
    }
    atomic_torch_save(obj, path)


def read(path: Path) -> dict[str, Any]:
    """Load and structurally check a checkpoint file."""
    if not path.is_file():
        raise CheckpointError(f"Checkpoint `{path}` does not exist. Pass the path of a saved checkpoint.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint `{path}` is corrupt or not a swiftdp checkpoint ({type(e).__name__}: "
            f"{e}). Use an earlier checkpoint."
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"`{path}` is not a swiftdp checkpoint.")
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"Checkpoint `{path}` has version {obj.get('version')!r}; this swiftdp reads {VERSION}."
        )
    missing = [k for k in ("privacy", "model", "optimizer", "accountant", "num_samples") if k not in obj]
    if missing:
        raise CheckpointError(f"Checkpoint `{path}` is incomplete: missing {missing}.")
    return obj


def load(run: PrivateTraining, path: Path) -> dict[str, Any]:
    """Restore ``run`` from ``path``; returns the checkpoint's ``extra`` dict."""
    obj = read(path)
    saved = obj["privacy"]
    now = run.privacy.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in _MATCH_KEYS
             if saved.get(k) != now[k]]
    if obj["num_samples"] != run.num_samples:
        diffs.append(f"dataset size: checkpoint {obj['num_samples']} vs now {run.num_samples}")
    if diffs:
        raise CheckpointError(
            f"Checkpoint `{path}` belongs to a different run ({'; '.join(diffs)}). Resume with "
            "the same privacy settings and dataset, or start a new run."
        )
    try:
        run.model.load_state_dict(obj["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"Checkpoint `{path}` does not match the model: {e}") from None
    run.optimizer.load_state_dict(obj["optimizer"])
    run.accountant.load_state_dict(obj["accountant"])
    sampler = getattr(run.data_loader.loader, "poisson_sampler", None)
    if sampler is not None and obj.get("sampler") is not None:
        sampler.load_state_dict(obj["sampler"])
    return dict(obj.get("extra") or {})
