"""The `text` dataset: a local file's bytes as fixed-length blocks, one block one example."""

from __future__ import annotations

import pytest
import torch

from swiftdp.data import DataError, load_dataset, validation_split
from swiftdp.data.text import BOS_ID, MIN_BLOCKS, TEST_FRACTION, VOCAB_SIZE, blocks, load_text


def test_blocks_are_the_file_bytes_in_order_after_a_start_id():
    data = bytes(range(256)) * 3 + b"tail"
    ids = blocks(data, 64)
    assert ids.shape == (12, 65) and ids.dtype == torch.int64
    assert (ids[:, 0] == BOS_ID).all()
    assert bytes(ids[:, 1:].reshape(-1).tolist()) == data[: 12 * 64]  # the 4 extra bytes dropped


def test_test_split_is_the_end_of_the_file_and_the_splits_partition_the_blocks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(i % 251 for i in range(40 * 50)))
    ds = load_text(path, seq_len=50)
    assert (len(ds.train), len(ds.test)) == (36, 4)  # TEST_FRACTION of the 40 blocks
    assert TEST_FRACTION == 0.1
    whole = blocks(path.read_bytes(), 50)
    assert torch.equal(torch.cat([ds.train.x, ds.test.x]), whole)
    assert torch.equal(ds.train.y, ds.train.x) and torch.equal(ds.test.y, ds.test.x)
    assert ds.task == "language-modelling" and ds.input_shape == (51,)
    assert ds.num_classes == VOCAB_SIZE == 257


def test_validation_of_text_is_the_last_fifth_of_the_training_blocks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcdefgh" * 100)
    train = load_dataset("text", data_file=path, seq_len=8).train
    fit, val = validation_split(train, task="language-modelling")
    assert len(fit) + len(val) == len(train) and len(val) == round(0.2 * len(train))
    assert torch.equal(torch.cat([fit.x, val.x]), train.x)


def test_missing_path_names_the_option():
    with pytest.raises(DataError, match="--data-file PATH"):
        load_text(None, 128)


@pytest.mark.parametrize("kind", ["missing", "folder", "empty"])
def test_unusable_file_is_refused_naming_the_path(tmp_path, kind):
    path = tmp_path / "corpus.txt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"--data-file '.*corpus\.txt'") as info:
        load_text(path, 128)
    assert {"missing": "does not exist", "folder": "folder", "empty": "empty"}[kind] in str(
        info.value)


def test_too_short_file_says_how_many_bytes_are_needed_and_the_seq_len_that_fits(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(DataError) as info:
        load_text(path, 128)
    message = str(info.value)
    for needle in ("1,000 bytes", "7 block(s)", "--seq-len 128", f"{MIN_BLOCKS} blocks",
                   "1,280 bytes", "at most 100"):
        assert needle in message, message
    assert len(load_text(path, 100).test) == 1  # the suggested --seq-len works
