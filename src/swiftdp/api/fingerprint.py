"""A fingerprint of a map-style dataset, binding a checkpoint to the data it was trained on.

:func:`dataset_fingerprint` hashes a dataset's size and examples, in order,
so that a run resumed on different data (other examples, order or
preprocessing) is refused by :func:`swiftdp.api.checkpoint.load`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["FINGERPRINT_SAMPLE", "FULL_FINGERPRINT_LIMIT", "dataset_fingerprint"]

FULL_FINGERPRINT_LIMIT = 65_536
"""Datasets up to this many examples are fingerprinted example by example."""
FINGERPRINT_SAMPLE = 8_192
"""Examples hashed (at fixed pseudo-random indices, plus the size) for larger datasets."""


def dataset_fingerprint(dataset: Any) -> str:
    """A SHA-256 over a map-style dataset's size and examples, in order.

    Every example ``dataset[i]`` is serialised stably: tensors and numpy
    arrays as dtype, shape and raw bytes (on the CPU); numbers, strings and
    ``None`` by ``repr``; dicts, lists and tuples element by element; objects
    with ``__array__`` (PIL images) as arrays. Other objects count only by
    their type. Random transforms are made repeatable: torch's, numpy's and
    Python's global generators are seeded with 0 while the examples are read,
    and restored afterwards (the training streams are not disturbed).

    Datasets up to :data:`FULL_FINGERPRINT_LIMIT` examples are hashed in full
    (the 4,000 mnist5k training examples take about 0.1 s, 65,536 MNIST-sized
    tensors about 2 s, once per run). Larger ones hash the size and
    :data:`FINGERPRINT_SAMPLE` examples at fixed pseudo-random indices, so
    that a first checkpoint of an ImageNet-sized folder does not read every
    image; a change confined to unsampled examples is then not detected.

    Args:
        dataset: a map-style dataset (``len`` and ``dataset[i]``).

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    n = len(dataset)
    if n <= FULL_FINGERPRINT_LIMIT:
        indices: list[int] = list(range(n))
    else:
        indices = sorted({
            int.from_bytes(hashlib.sha256(b"swiftdp-fingerprint-%d" % j).digest()[:8], "big") % n
            for j in range(FINGERPRINT_SAMPLE)
        })
    h = hashlib.sha256()
    _update(h, "swiftdp-dataset/1", f"n={n} hashed={len(indices)}".encode())
    with _fixed_global_generators():
        for i in indices:
            _update(h, "index", str(i).encode())
            _hash_value(h, dataset[i])
    return "sha256:" + h.hexdigest()


def _update(h: Any, tag: str, data: bytes) -> None:
    h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little") + data)


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach()
        t = (t.to_dense() if t.layout != torch.strided else t).cpu().resolve_conj().resolve_neg()
        t = t.contiguous().reshape(-1)
        _update(h, f"tensor {t.dtype} {tuple(value.shape)}", t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray | np.generic):
        a = np.ascontiguousarray(value)
        if a.dtype == object:
            _update(h, f"object-array {a.shape}", b"")
            for item in a.ravel():
                _hash_value(h, item)
        else:
            _update(h, f"ndarray {a.dtype.str} {a.shape}", a.tobytes())
    elif value is None or isinstance(value, bool | int | float | complex | str):
        _update(h, type(value).__name__, repr(value).encode())
    elif isinstance(value, bytes | bytearray):
        _update(h, "bytes", bytes(value))
    elif isinstance(value, Mapping):
        _update(h, f"mapping {len(value)}", b"")
        for key, item in value.items():
            _hash_value(h, key)
            _hash_value(h, item)
    elif isinstance(value, list | tuple):
        _update(h, f"sequence {len(value)}", b"")
        for item in value:
            _hash_value(h, item)
    elif hasattr(value, "__array__") or hasattr(value, "__array_interface__"):
        _update(h, f"array-like {type(value).__qualname__}", b"")
        _hash_value(h, np.asarray(value))
    else:
        _update(h, f"object {type(value).__module__}.{type(value).__qualname__}", b"")


@contextmanager
def _fixed_global_generators() -> Iterator[None]:
    """Seed torch's (CPU), numpy's and Python's global generators with 0; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # restores the CPU generator; CUDA's is not used
        torch.default_generator.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
