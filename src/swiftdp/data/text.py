"""A local text file as byte-level language-modelling examples; nothing is downloaded.

The file is read as raw bytes (no tokenizer: the vocabulary is the 256 byte
values plus one special id, :data:`BOS_ID`) and cut into consecutive,
non-overlapping blocks of ``seq_len`` bytes; the last ``len % seq_len``
bytes are dropped. Each block is **one example**: the privacy unit of DP
training on this dataset is one block of the file, not one user or one
document, so a person whose text spans many blocks is protected only as much
as that many examples allow (group privacy).

An example is ``[BOS_ID, b_1, ..., b_seq_len]`` (``seq_len + 1`` ids), so
every byte of the block is predicted, the first one from the start marker.
Its label is the same sequence (a causal LM shifts it inside its loss).

Splits are contiguous, in file order: the last :data:`TEST_FRACTION` of the
blocks are the test split, the rest the training split;
:func:`tail_split` carves a validation part off the end of the training
split the same way. Neighbouring text is never in two splits except at the
one boundary between them.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_bytes(b"hello world " * 100)
    >>> ds = load_text(path, seq_len=16)
    >>> len(ds.train), len(ds.test), ds.input_shape, ds.num_classes
    (67, 8, (17,), 257)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from swiftdp.data.types import DataError, Dataset, Split

BYTE_VOCAB = 256
"""Ids ``0 .. 255`` are the byte values."""

BOS_ID = 256
"""The start-of-block id prepended to every example (never a byte of the file)."""

VOCAB_SIZE = BYTE_VOCAB + 1
"""Size of the byte vocabulary with its special id: the smallest ``vocab_size`` a model may have."""

TEST_FRACTION = 0.1
"""Share of the blocks (the end of the file) held out as the test split."""

MIN_BLOCKS = 10
"""The fewest blocks a file must give (so that each split holds at least one)."""


def encode(data: bytes) -> Tensor:
    """The byte values of ``data`` as int64 token ids ``(len(data),)``."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def blocks(data: bytes, seq_len: int) -> Tensor:
    """Cut ``data`` into ``(N, seq_len + 1)`` examples: :data:`BOS_ID`, then ``seq_len`` bytes.

    Args:
        data: the file's content.
        seq_len: bytes per block.

    Returns:
        int64 ids; block ``i`` holds bytes ``i * seq_len`` to ``(i + 1) * seq_len - 1``.
    """
    n = len(data) // seq_len
    ids = encode(data[: n * seq_len]).view(n, seq_len)
    return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.int64), ids], dim=1)


def tail_split(split: Split, fraction: float) -> tuple[Split, Split]:
    """Split ``split`` in order: the first examples, and the last ``fraction`` of them.

    Args:
        split: blocks in file order.
        fraction: share for the second part, in (0, 1); at least one example goes to each.

    Returns:
        ``(head, tail)``.
    """
    n = len(split)
    k = min(n - 1, max(1, round(fraction * n)))
    return split.subset(torch.arange(n - k)), split.subset(torch.arange(n - k, n))


def load_text(path: str | Path | None, seq_len: int) -> Dataset:
    """Read a text file as byte blocks, split into training and test blocks.

    Args:
        path: the file (``--data-file``).
        seq_len: bytes per block (``--seq-len``).

    Returns:
        A :class:`Dataset` with ``task="language-modelling"``,
        ``input_shape=(seq_len + 1,)`` and ``num_classes=VOCAB_SIZE``; ``x`` and
        ``y`` of each split are the same ids.

    Raises:
        DataError: no path, a file that is missing, unreadable or empty, or too
            short to give :data:`MIN_BLOCKS` blocks.
    """
    if path is None:
        raise DataError(
            "Dataset 'text' is read from a local file: pass --data-file PATH (a text file, "
            "read as bytes; swiftdp never downloads data)."
        )
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"--data-file {str(path)!r} {what}; pass the path of a text file.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"--data-file {str(path)!r} cannot be read ({e.strerror}).") from None
    if not data:
        raise DataError(f"--data-file {str(path)!r} is empty; pass a file that holds text.")
    n = len(data) // seq_len
    if n < MIN_BLOCKS:
        raise DataError(
            f"--data-file {str(path)!r} holds {len(data):,} bytes, {n} block(s) of --seq-len "
            f"{seq_len}; at least {MIN_BLOCKS} blocks ({MIN_BLOCKS * seq_len:,} bytes) are "
            f"needed. Use a longer file or a smaller --seq-len (at most "
            f"{max(1, len(data) // MIN_BLOCKS)} for this file)."
        )
    ids = blocks(data, seq_len)
    train, test = tail_split(Split(ids, ids), TEST_FRACTION)
    return Dataset("text", train, test, (seq_len + 1,), VOCAB_SIZE, task="language-modelling")
