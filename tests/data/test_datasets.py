"""Datasets: fixed splits of the bundled data, torchvision-format folders, clear refusals."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from swiftdp.data import (
    DataError,
    load_dataset,
    read_idx,
    stratified_split,
    validation_split,
)


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    ds = load_dataset("mnist5k")
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert torch.equal(ds.train.y.bincount(), torch.full((10,), 400))
    assert torch.equal(ds.test.y.bincount(), torch.full((10,), 100))
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0
    again = load_dataset("mnist5k")
    assert torch.equal(ds.test.x, again.test.x)
    # No test image appears in the training split.
    train_rows = {row.numpy().tobytes() for row in ds.train.x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in ds.test.x.flatten(1))


def test_digits_split():
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert len(ds.test) == 359


def test_validation_split_partitions_the_training_split_only():
    train = load_dataset("mnist5k").train
    fit, val = validation_split(train)
    assert len(fit) == 3200 and len(val) == 800
    assert torch.equal(val.y.bincount(), torch.full((10,), 80))
    rows = {r.numpy().tobytes() for r in fit.x.flatten(1)}
    assert not any(r.numpy().tobytes() in rows for r in val.x.flatten(1))


def test_stratified_split_is_deterministic_and_a_partition():
    labels = np.repeat(np.arange(3), 10)
    a1, b1 = stratified_split(labels, 0.3, seed=4)
    a2, b2 = stratified_split(labels, 0.3, seed=4)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert sorted(np.concatenate([a1, b1]).tolist()) == list(range(30))
    assert np.bincount(labels[a1]).tolist() == [3, 3, 3]


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_mnist_from_a_torchvision_raw_folder(tmp_path, compressed):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(10),
    }
    for name, arr in files.items():
        data = _idx(arr)
        if compressed:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    ds = load_dataset("mnist", tmp_path)
    assert len(ds.train) == 20 and len(ds.test) == 10 and ds.input_shape == (1, 28, 28)
    assert torch.allclose(ds.train.x[3, 0] * 255, torch.tensor(
        files["train-images-idx3-ubyte"][3], dtype=torch.float32))
    assert ds.test.y.tolist() == list(range(10))
    assert len(load_dataset("mnist", raw).train) == 20  # the raw folder itself works too


def test_cifar10_from_a_torchvision_python_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [0, 1, 2, 9]}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
    ds = load_dataset("cifar10", tmp_path)
    assert len(ds.train) == 20 and len(ds.test) == 4
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10


def test_read_idx_refuses_non_idx_and_truncated_files(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "y"
    short.write_bytes(_idx(np.zeros((5, 2, 2)))[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_local_datasets_need_an_existing_folder(name, tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset(name)
    with pytest.raises(DataError, match="not a readable folder"):
        load_dataset(name, tmp_path / "missing")
    with pytest.raises(DataError, match="expects"):
        load_dataset(name, tmp_path)


def test_unknown_dataset_is_refused():
    with pytest.raises(DataError, match="Unknown dataset"):
        load_dataset("imagenet")
