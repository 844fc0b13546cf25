"""Datasets read from a local folder in torchvision's on-disk format; never downloaded.

- ``mnist``: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (the folder ``torchvision.datasets.MNIST(root=data_dir, download=True)`` leaves).
- ``cifar10``: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
  (the folder ``torchvision.datasets.CIFAR10(root=data_dir, download=True)`` leaves).

``data_dir`` may also point at the inner folder (``MNIST/raw``, ``MNIST`` or
``cifar-10-batches-py``). The idx files are parsed with numpy and the CIFAR
batches with ``pickle`` (as torchvision does: only read folders you trust).
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from swiftdp.data.types import DataError, Split

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _need_dir(data_dir: str | Path | None, dataset: str, layout: str) -> Path:
    if data_dir is None:
        raise DataError(
            f"Dataset {dataset!r} is read from a local folder: pass --data-dir DIR with {layout} "
            "(swiftdp never downloads data)."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"--data-dir {str(data_dir)!r} is not a readable folder; dataset {dataset!r} "
            f"expects {layout}."
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (MNIST's format), gzip-compressed or not.

    Args:
        path: the file.

    Returns:
        The array, with the shape and dtype the header gives.

    Raises:
        DataError: the file is unreadable or not an idx file.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"Cannot read idx file `{path}`: {e}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"`{path}` is not an idx file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) < header + count * dtype.itemsize:
        raise DataError(f"idx file `{path}` is truncated: header says shape {shape}.")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_mnist_file(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(data_dir: str | Path | None) -> tuple[Split, Split]:
    """MNIST (60,000 train / 10,000 test) from torchvision's raw idx files.

    Args:
        data_dir: the folder holding ``MNIST/raw`` (or that folder itself).

    Returns:
        ``(train, test)`` with images ``(N, 1, 28, 28)`` in [0, 1].

    Raises:
        DataError: the folder or a file is missing or unreadable.
    """
    layout = "MNIST/raw/train-images-idx3-ubyte and the three other idx files"
    root = _need_dir(data_dir, "mnist", layout)
    parts = []
    for split in ("train", "test"):
        arrays = []
        for name in MNIST_FILES[split]:
            path = _find_mnist_file(root, name)
            if path is None:
                raise DataError(
                    f"--data-dir {str(data_dir)!r} has no {name}[.gz] (looked in MNIST/raw, "
                    "raw and the folder itself); dataset 'mnist' expects " + layout + "."
                )
            arrays.append(read_idx(path))
        images, labels = arrays
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"MNIST {split} files in {str(data_dir)!r} have mismatched shapes.")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        parts.append(Split(x, torch.from_numpy(labels.astype(np.int64))))
    return parts[0], parts[1]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"Cannot read CIFAR-10 batch `{path}` ({type(e).__name__}: {e}).") from None
    return data, labels


def load_cifar10(data_dir: str | Path | None) -> tuple[Split, Split]:
    """CIFAR-10 (50,000 train / 10,000 test) from torchvision's python pickles.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py`` (or that folder itself).

    Returns:
        ``(train, test)`` with images ``(N, 3, 32, 32)`` in [0, 1].

    Raises:
        DataError: the folder or a batch file is missing or unreadable.
    """
    layout = "cifar-10-batches-py/data_batch_1..5 and test_batch"
    root = _need_dir(data_dir, "cifar10", layout)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"--data-dir {str(data_dir)!r} lacks {', '.join(missing)}; dataset 'cifar10' "
            f"expects {layout}."
        )
    parts = []
    for names in (CIFAR10_TRAIN, (CIFAR10_TEST,)):
        batches = [_read_cifar_batch(folder / n) for n in names]
        x = np.concatenate([b[0] for b in batches]).astype(np.float32) / 255.0
        y = np.concatenate([b[1] for b in batches])
        parts.append(Split(torch.from_numpy(x), torch.from_numpy(y)))
    return parts[0], parts[1]
