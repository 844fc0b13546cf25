"""The checkpoint file's envelope: a fixed-size JSON header with the payload's length and SHA-256.

See :mod:`swiftdp.api.checkpoint` for the layout and what the checksum does
and does not protect against.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

import torch

from swiftdp.errors import CheckpointError

FORMAT = "swiftdp-checkpoint"
VERSION = 2
HEADER_SIZE = 256
"""Bytes of the JSON header in front of the payload (newline included)."""


class HashingWriter:
    """Forwards writes to a file, hashing and counting the bytes."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()


def write_envelope(f: IO[bytes], payload: dict[str, Any]) -> None:
    """Write a placeholder header, stream the payload through the hash, then the header."""
    f.write(b" " * HEADER_SIZE)
    writer = HashingWriter(f)
    torch.save(payload, writer)  # type: ignore[arg-type]
    f.seek(0)
    f.write(encode_header(writer.size, writer.sha256.hexdigest()))


def encode_header(payload_bytes: int, payload_sha256: str) -> bytes:
    fields = {"format": FORMAT, "version": VERSION, "payload_bytes": payload_bytes,
              "payload_sha256": payload_sha256}
    return json.dumps(fields, separators=(",", ":")).encode("ascii").ljust(HEADER_SIZE - 1) + b"\n"


def parse_header(path: Path, header: bytes) -> tuple[int, str]:
    """Return ``(payload_bytes, payload_sha256)`` from a header that is exactly canonical."""
    if len(header) < HEADER_SIZE:
        raise corrupt(path, f"it ends after {len(header)} bytes, inside the {HEADER_SIZE}-byte "
                             "header (truncated, or not a swiftdp checkpoint)")
    try:
        fields = json.loads(header.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt(path, "its header is unreadable (damaged, or not a swiftdp "
                             "checkpoint)") from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise corrupt(path, "its header does not name the swiftdp checkpoint format")
    if fields.get("version") != VERSION:
        raise CheckpointError(
            f"Checkpoint `{path}` has version {fields.get('version')!r}; this swiftdp reads "
            f"version {VERSION}. Resume it with the swiftdp version that wrote it."
        )
    size, digest = fields.get("payload_bytes"), fields.get("payload_sha256")
    if (not isinstance(size, int) or not isinstance(digest, str)
            or header != encode_header(size, digest)):
        raise corrupt(path, "its header is damaged")
    return size, digest


def corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint `{path}` is corrupt: {what}. Do not resume from it; use an earlier "
        "checkpoint, or start a new run."
    )
