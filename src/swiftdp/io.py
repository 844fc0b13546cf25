"""Crash-safe file writes: temporary file, fsync, rename, and cleanup of orphans.

:func:`atomic_write` writes to ``.NAME.<pid>.<random>.tmp`` next to the
target, flushes it to disk and renames it over ``NAME``, so a reader sees
either the old file or the new one, never a half-written one. A process
killed during the write (``SIGKILL``, power loss) cannot remove its
temporary file; the next write of the same target removes such orphans,
leaving alone those of writers that are still running.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

_TEMP_SUFFIX = ".tmp"
# Temporary names written by older swiftdp versions (``tempfile.mkstemp``):
# no writer pid, eight random characters.
_LEGACY_RANDOM = r"[a-z0-9_]{8}"


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Run ``write`` on a temporary file in ``path``'s folder, fsync, rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a
    half-written file. Orphaned temporary files of earlier, killed writes of
    the same target are removed first (see :func:`remove_orphan_temp_files`).
    The file is created with mode ``0o600`` (owner only).

    Args:
        path: the target file.
        write: writes the content to the open binary file it is given; it
            may seek within that file.

    Raises:
        OSError: the folder cannot be created or written. Whatever ``write``
            raises propagates too; in every case the temporary file is
            removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temp_files(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`).

    Args:
        obj: what to save.
        path: the target file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_orphan_temp_files(path: Path) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left behind.

    A temporary file ``.NAME.<pid>.<random>.tmp`` is an orphan when no
    process with that pid is running (a pid reused since is taken as alive,
    so its file stays until a later write). Files in the format of older
    swiftdp versions (``.NAME.<8 characters>.tmp``, no pid) are orphans.
    Files of other targets (``.NAME2.*.tmp``) are never touched. Writers on
    other machines sharing the folder are not detected: do not write one
    target from several machines at once.

    Args:
        path: the target file whose orphans to remove.

    Returns:
        The files removed.
    """
    name = re.escape(f".{path.name}.")
    current = re.compile(name + r"(\d+)\.[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX))
    legacy = re.compile(name + _LEGACY_RANDOM + re.escape(_TEMP_SUFFIX))
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    for candidate in candidates:
        match = current.fullmatch(candidate.name)
        if match is not None and _process_is_running(int(match.group(1))):
            continue
        if match is None and legacy.fullmatch(candidate.name) is None:
            continue
        try:
            candidate.unlink()
        except FileNotFoundError:  # removed by a concurrent cleanup
            continue
        removed.append(candidate)
    return removed


def _process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    if os.name != "posix":
        return True  # no harmless liveness probe (os.kill would signal it): keep the file
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # PermissionError: alive, another user's
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
