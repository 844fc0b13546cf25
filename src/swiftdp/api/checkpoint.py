"""Atomic, checksummed checkpoints of a private training run, bound to its dataset.

A checkpoint holds the model, the optimizer, the accountant's history, the
sampler's position, the privacy settings and a fingerprint of the training
data (:func:`~swiftdp.api.fingerprint.dataset_fingerprint`, re-exported here).

The noise generator, and what a checkpoint reveals:

* ``secure=True``: the noise generator's state is never written. A resumed
  run reseeds it from OS entropy, so no noise is ever replayed and no file
  helps anyone subtract the noise from a released model.
* seeded mode (``secure=False``, the default): the generator's state is
  saved, so a resumed run continues the noise stream bit for bit. Anyone
  holding the checkpoint can then regenerate the noise of every later step
  and, with the next released model, recover that step's noise-free sum of
  clipped gradients. **In seeded mode a checkpoint is as secret as the
  training data**: store and delete it like the data itself.

File layout (version 2): a fixed :data:`HEADER_SIZE`-byte ASCII JSON header
``{"format", "version", "payload_bytes", "payload_sha256"}`` padded with
spaces and ended by a newline, then the ``torch.save`` payload. Reading
checks the header (its bytes must be exactly the canonical encoding), the
payload's length and SHA-256 *before* anything is unpickled, then loads the
payload with ``torch.load(weights_only=True)``, which builds only tensors and
plain values. A flipped bit, a truncated file or an edited payload is refused
with :class:`~swiftdp.errors.CheckpointError`. The checksum detects damage and
edits made without recomputing it; it is not a signature: whoever can write
the file can recompute it, so keep checkpoints where only the run's owner
can write. Files are written with :func:`swiftdp.io.atomic_write` (temporary
file, fsync, rename; orphans of killed writes removed).

Version 1 files (a bare ``torch.save``, no checksum or fingerprint) are
refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import io
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from swiftdp.accounting import PrivacyAccountant
from swiftdp.api.checkpoint_ranks import (
    check_same_file,
    gather_noise_states,
    noise_state_for,
    shared_generator_state,
    together,
)
from swiftdp.api.envelope import FORMAT, HEADER_SIZE, VERSION
from swiftdp.api.envelope import corrupt as _corrupt
from swiftdp.api.envelope import parse_header as _parse_header
from swiftdp.api.envelope import write_envelope as _write_envelope
from swiftdp.api.fingerprint import FINGERPRINT_SAMPLE, FULL_FINGERPRINT_LIMIT, dataset_fingerprint
from swiftdp.clipping.loss_trace import Traced
from swiftdp.errors import CheckpointError, InvalidArgumentError
from swiftdp.io import atomic_torch_save, atomic_write
from swiftdp.optim.noise import is_secure, reseed_from_os_entropy
from swiftdp.optim.optimizer import DPOptimizer
from swiftdp.settings import PrivacySettings

# Re-exported: atomic_write / atomic_torch_save live in swiftdp.io; dataset_fingerprint and
# its limits in swiftdp.api.fingerprint.
__all__ = [
    "FINGERPRINT_SAMPLE",
    "FORMAT",
    "FULL_FINGERPRINT_LIMIT",
    "HEADER_SIZE",
    "VERSION",
    "Run",
    "RunLoader",
    "atomic_torch_save",
    "atomic_write",
    "dataset_fingerprint",
    "load",
    "read",
    "run_dataset_fingerprint",
    "save",
]


# σ is not matched: a noise schedule changes it during the run; the checkpoint's
# σ (in the optimizer state) and σ history (in the accountant) are restored.
_MATCH_KEYS = ("max_grad_norm", "delta", "sample_rate",
               "expected_batch_size", "clipping", "poisson_sampling", "accountant", "adaptive")
_REQUIRED = ("privacy", "secure", "num_samples", "dataset_fingerprint", "model", "optimizer",
             "accountant", "sampler", "extra")
_ZIP_MAGIC = b"PK\x03\x04"
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
                torch.Size, Tensor, nn.Parameter)


class RunLoader(Protocol):
    """What a checkpoint needs of a run's data loader (:class:`~swiftdp.api.DPDataLoader`)."""

    @property
    def loader(self) -> Any:
        """The underlying ``DataLoader``; its ``poisson_sampler``, if any, is saved."""
        ...

    @property
    def steps_in_epoch(self) -> int:
        """Logical batches drawn in the current epoch (the sampler's position)."""
        ...

    @property
    def dataset(self) -> Any:
        """The training data, fingerprinted by :func:`dataset_fingerprint`."""
        ...


class Run(Protocol):
    """What :func:`save` and :func:`load` need of a training run.

    :class:`~swiftdp.api.PrivateTraining` is one; this module does not import
    it, so that module can import this one without an import cycle.
    """

    @property
    def model(self) -> nn.Module:
        """The model whose ``state_dict`` is saved."""
        ...

    @property
    def optimizer(self) -> DPOptimizer:
        """The DP optimizer (its state, σ schedule and noise generator)."""
        ...

    @property
    def accountant(self) -> PrivacyAccountant:
        """The accountant whose history is saved."""
        ...

    @property
    def data_loader(self) -> RunLoader:
        """The loader whose sampler position is saved."""
        ...

    @property
    def privacy(self) -> PrivacySettings:
        """The privacy settings a resumed run must match."""
        ...

    @property
    def num_samples(self) -> int:
        """The dataset size a resumed run must match."""
        ...


_FINGERPRINTS: weakref.WeakKeyDictionary[Run, str] = weakref.WeakKeyDictionary()


def save(run: Run, path: Path, extra: dict[str, Any]) -> None:
    """Write ``run``'s complete state to ``path`` atomically, with checksum and fingerprint.

    In seeded mode the noise generator's state is included, which makes the
    file as secret as the training data; with ``secure=True`` it is left out.
    In a process group every rank calls it: rank 0 writes the file, with every
    rank's noise state (:mod:`swiftdp.api.checkpoint_ranks`), and ``extra`` is
    rank 0's.

    Args:
        run: the training run.
        path: the checkpoint file.
        extra: the caller's own values (tensors and plain values only).

    Raises:
        InvalidArgumentError: the state holds a value that
            ``torch.load(weights_only=True)`` could not rebuild (the message
            names where).
        StepStructureError: in a process group, a rank did not call it in time.
        CheckpointError: in a process group, it failed on another rank.
    """
    _refuse_pipeline_stage(run, "save_checkpoint")
    ranks = run.optimizer.ranks
    if ranks is not None:
        ranks.rendezvous(f"save_checkpoint after {run.optimizer.steps_taken} steps")
    payload = together(ranks, "save_checkpoint", lambda: _payload(run, extra))
    states = gather_noise_states(ranks, payload["optimizer"].get("noise_generator"))
    payload["noise_generators"] = states
    if ranks is not None:  # at the same step: the rendezvous compared "after N steps"
        payload["world_size"] = ranks.world
    together(ranks, "save_checkpoint", lambda: (
        atomic_write(path, lambda f: _write_envelope(f, payload))
        if ranks is None or ranks.rank == 0 else None))


def _refuse_pipeline_stage(run: Run, what: str) -> None:
    # Per-stage files would let two stages resume one noise stream (identical noise on
    # both: their difference noise-free) or, secure, draw different samples: refused
    # until stage checkpoints are collective over the pipeline.
    if run.privacy.pipeline_stage is not None:
        raise CheckpointError(
            f"{what} is not supported for pipeline stages yet (pipeline_stage="
            f"{run.privacy.pipeline_stage}): checkpoints of a pipeline must be written and "
            "restored by all stages together, with a noise stream and the same sampling "
            "state per stage. Checkpoint data-parallel or one-process runs.")


def _payload(run: Run, extra: dict[str, Any]) -> dict[str, Any]:
    loader = run.data_loader.loader
    sampler = getattr(loader, "poisson_sampler", None)
    sampler_state = None
    if sampler is not None:
        sampler_state = sampler.state_dict(steps_consumed=run.data_loader.steps_in_epoch)
    secure = is_secure(run.optimizer.generator)
    optimizer_state = run.optimizer.state_dict()
    if secure:
        optimizer_state.pop("noise_generator", None)
        if sampler_state is not None:
            # Batch membership is secret too (amplification by sampling): a
            # secure run keeps the sampler's position, never its seed or state.
            sampler_state = {**sampler_state, "seed": None, "generator_state": None}
    payload = {
        "privacy": run.privacy.to_dict(),
        "secure": secure,
        "num_samples": run.num_samples,
        "dataset_fingerprint": run_dataset_fingerprint(run),
        "model": run.model.state_dict(),
        "optimizer": optimizer_state,
        "accountant": run.accountant.state_dict(),
        "sampler": sampler_state,
        "extra": extra,
        "world_size": 1,
    }
    for key, value in payload.items():
        _check_plain(value, key)
    return payload


def read(path: Path) -> dict[str, Any]:
    """Verify a checkpoint file and return its payload (nothing is unpickled before).

    The payload's SHA-256 is under the key ``"sha256"`` of the returned dict.

    Args:
        path: the checkpoint file.

    Returns:
        The payload dict (``privacy``, ``model``, ``optimizer``, ``accountant``,
        ``sampler``, ``extra``, ...).

    Raises:
        CheckpointError: the file is missing, of another format or version,
            truncated, damaged or edited (checksum mismatch), or incomplete.
    """
    if not path.is_file():
        raise CheckpointError(f"Checkpoint `{path}` does not exist. Pass the path of a saved checkpoint.")
    with path.open("rb") as f:
        header = f.read(HEADER_SIZE)
        payload = f.read()
    if header.startswith(_ZIP_MAGIC):
        raise CheckpointError(
            f"Checkpoint `{path}` is in the version-1 format of older swiftdp releases (no "
            f"checksum, no dataset fingerprint); this swiftdp reads version {VERSION} only. "
            "Resume it with the swiftdp version that wrote it, or start a new run."
        )
    size, digest = _parse_header(path, header)
    if len(payload) != size:
        what = "truncated" if len(payload) < size else "longer than written"
        raise _corrupt(path, f"it is {what}: the header announces {size} payload bytes, the "
                             f"file holds {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _corrupt(path, "its contents do not match the SHA-256 checksum recorded when it "
                             "was written (a damaged or edited byte)")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _corrupt(path, f"its payload cannot be loaded ({type(e).__name__}: {e})") from None
    missing = [k for k in _REQUIRED if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise _corrupt(path, f"it is incomplete: missing {missing}")
    not_dicts = [k for k in ("privacy", "model", "optimizer", "accountant", "extra")
                 if not isinstance(obj[k], dict)]
    if not_dicts:
        raise _corrupt(path, f"its parts {not_dicts} are not dicts")
    return {**obj, "sha256": digest}


def load(run: Run, path: Path) -> dict[str, Any]:
    """Restore ``run`` from ``path``; on any refusal ``run`` is left unchanged.

    A secure run's noise generator is reseeded from OS entropy instead of
    restored (its state was never saved). In a process group every rank
    calls it, on the same file, on any number of ranks
    (:mod:`swiftdp.api.checkpoint_ranks`).

    Args:
        run: the training run, built as the one that wrote the checkpoint.
        path: the checkpoint file.

    Returns:
        The checkpoint's ``extra`` dict.

    Raises:
        CheckpointError: :func:`read` refuses the file, or it belongs to a
            different run (privacy settings, ``secure``, dataset content,
            model) or its parts contradict each other; in a process
            group, it was refused on another rank or the ranks read different files.
        StepStructureError: in a process group, a rank did not call it in time.
    """
    _refuse_pipeline_stage(run, "load_checkpoint")
    ranks = run.optimizer.ranks
    if ranks is not None:
        ranks.rendezvous("load_checkpoint")
    obj = together(ranks, "load_checkpoint", lambda: read(path))  # no collective inside
    check_same_file(ranks, str(path), obj["sha256"])
    obj, noise = together(ranks, "load_checkpoint", lambda: _checked(run, path, obj))
    _apply(run, path, obj, noise)
    return dict(obj["extra"] or {})


def _checked(run: Run, path: Path, obj: dict[str, Any]
             ) -> tuple[dict[str, Any], tuple[Tensor | None, int | None]]:
    """Check the checkpoint ``obj`` read from ``path`` against ``run`` (no collective inside).

    Returns:
        ``obj`` and the noise state or seed this rank resumes with.
    """
    ranks = run.optimizer.ranks
    secure = is_secure(run.optimizer.generator)
    saved, now = dict(obj["privacy"]), run.privacy.to_dict()
    # A clip schedule or adaptive clipping moves C: the run's first C is what must match.
    initial = obj["optimizer"].get("initial_max_grad_norm") if isinstance(
        obj["optimizer"], dict) else None
    if initial is not None:
        saved["max_grad_norm"] = initial
    now["max_grad_norm"] = run.optimizer.initial_max_grad_norm
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in _MATCH_KEYS
             if saved.get(k) != now[k]]
    accountant = _checked_accountant(path, run.accountant.mechanism, obj)
    # σ may follow a schedule: the run's starting σ is the first one accounted.
    history = accountant.history
    start_sigma = history[0].noise_multiplier if history else saved.get("noise_multiplier")
    if start_sigma != now["noise_multiplier"]:
        diffs.append(f"noise_multiplier: checkpoint run started at {start_sigma!r} vs now "
                     f"{now['noise_multiplier']!r}")
    if obj["secure"] != secure:
        diffs.append(f"secure: checkpoint {obj['secure']!r} vs now {secure!r}")
    if obj["num_samples"] != run.num_samples:
        diffs.append(f"dataset size: checkpoint {obj['num_samples']} vs now {run.num_samples}")
    fingerprint = run_dataset_fingerprint(run)
    if obj["dataset_fingerprint"] != fingerprint:
        diffs.append(f"dataset fingerprint: checkpoint {str(obj['dataset_fingerprint'])[:19]}... "
                     f"vs now {fingerprint[:19]}...")
    if diffs:
        raise CheckpointError(
            f"Checkpoint `{path}` belongs to a different run ({'; '.join(diffs)}). Resume with "
            "the same privacy settings, secure= setting and training data (same examples, "
            "order and preprocessing), or start a new run."
        )
    noise: tuple[Tensor | None, int | None] = (None, None)
    if not secure:
        states = obj.get("noise_generators") or [obj["optimizer"].get("noise_generator")]
        if (any(not isinstance(t, Tensor) for t in states)
                or len(states) != obj.get("world_size", 1)):
            raise _corrupt(path, "it lacks the noise generators' states")
        noise = noise_state_for(ranks, states, int(obj["optimizer"]["steps_taken"]))
    _check_model(path, run.model, obj["model"])
    _check_optimizer(path, run.optimizer, obj["optimizer"])
    obj["checked_accountant"] = accountant
    return obj, noise


def _apply(run: Run, path: Path, obj: dict[str, Any],
           noise: tuple[Tensor | None, int | None]) -> None:
    """Restore the checked checkpoint ``obj`` into ``run``."""
    ranks = run.optimizer.ranks
    secure = is_secure(run.optimizer.generator)
    optimizer_state = dict(obj["optimizer"])
    state, seed = noise
    optimizer_state["noise_generator"] = state
    try:
        run.optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"Checkpoint `{path}` does not match the optimizer: {e}") from None
    if secure:
        reseed_from_os_entropy(run.optimizer.generator)
    elif seed is not None:  # another number of ranks: a fresh stream per rank
        run.optimizer.generator.manual_seed(seed)
    run.model.load_state_dict(obj["model"])
    run.accountant.load_state_dict(obj["checked_accountant"].state_dict())
    sampler = getattr(run.data_loader.loader, "poisson_sampler", None)
    if sampler is not None and obj["sampler"] is not None:
        sampler_state = dict(obj["sampler"])
        if secure:  # fresh OS-entropy randomness for the batches still to come
            reseed_from_os_entropy(sampler.generator)
            shared_generator_state(ranks, sampler.generator)  # the same mask on every rank
            sampler_state.update(seed=None, generator_state=sampler.generator.get_state())
        sampler.load_state_dict(sampler_state)





def run_dataset_fingerprint(run: Run) -> str:
    """The fingerprint of ``run``'s training data, computed on first use and then cached.

    Args:
        run: the training run (its data is ``run.data_loader.dataset``).

    Returns:
        See :func:`dataset_fingerprint`.
    """
    cached = _FINGERPRINTS.get(run)
    if cached is None:
        cached = _FINGERPRINTS[run] = dataset_fingerprint(run.data_loader.dataset)
    return cached


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not rebuild."""
    kind = type(value)
    if kind in _PLAIN_TYPES or isinstance(value, Traced):  # (Traced pickles as a plain tensor)
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} (a key)")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise InvalidArgumentError(
        f"Cannot save the checkpoint: `{where}` is a {kind.__module__}.{kind.__qualname__}. "
        "Checkpoints hold only tensors and plain values (dict, list, tuple, set, str, bytes, "
        "int, float, bool, complex, None) so that they load without running pickled code. "
        "Convert it, e.g. with float(), .tolist() or torch.as_tensor()."
    )


# -- checks before the run is changed -----------------------------------------------------


def _checked_accountant(path: Path, mechanism: str, obj: dict[str, Any]) -> PrivacyAccountant:
    """The saved history in a fresh accountant, checked against the optimizer's step count."""
    accountant = PrivacyAccountant(mechanism)
    try:
        accountant.load_state_dict(obj["accountant"])
    except CheckpointError as e:
        raise CheckpointError(f"Checkpoint `{path}`: {e} Use an earlier checkpoint.") from None
    steps = obj["optimizer"].get("steps_taken") if isinstance(obj["optimizer"], dict) else None
    if not isinstance(steps, int):
        raise _corrupt(path, "its optimizer state lacks the step count")
    if accountant.total_steps < steps:
        raise _corrupt(path, f"its accountant history records {accountant.total_steps} steps but "
                             f"the optimizer took {steps} (history deleted or edited)")
    return accountant


def _check_optimizer(path: Path, optimizer: DPOptimizer, saved: dict[str, Any]) -> None:
    """Refuse an optimizer state whose parameter groups do not match (before anything changes)."""
    groups = saved.get("optimizer", {}).get("param_groups") if isinstance(
        saved.get("optimizer"), dict) else None
    now = [len(g["params"]) for g in optimizer.original_optimizer.param_groups]
    then = ([len(g.get("params", ())) for g in groups] if isinstance(groups, list)
            and all(isinstance(g, dict) for g in groups) else None)
    if then != now:
        raise CheckpointError(
            f"Checkpoint `{path}` does not match the optimizer: its parameter groups hold "
            f"{then} parameters, this optimizer's {now}. Build the same optimizer as the run "
            "that wrote it.")


def _check_model(path: Path, model: nn.Module, saved: Any) -> None:
    current = model.state_dict()
    if not isinstance(saved, Mapping):
        raise _corrupt(path, "its model state is not a dict")
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
              for k, v in current.items()
              if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"Checkpoint `{path}` does not match the model (missing {missing}, unexpected "
            f"{unexpected}, shapes {shapes}). Build the same model as the run that wrote it."
        )
