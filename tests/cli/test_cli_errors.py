"""Every bad input gives one line on stderr, `swiftdp: error: ...`, and exit code 2."""

from __future__ import annotations

import pytest
import torch

from swiftdp.cli.main import main

BASE = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--quiet",
        "--accountant", "rdp"]


def _assert_one_error_line(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("swiftdp: error:"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--dataset", "imagenet"], "--dataset"),
        (["train", "--model", "alexnet"], "--model"),
        (["train", "--optimizer", "lion"], "--optimizer"),
        (["train", "--clipping", "per-layer-magic"], "--clipping"),
        (["train", "--mode", "fast"], "--mode"),
        (["train", "--device", "tpu"], "--device"),
        (["train", "--epochs", "many"], "--epochs"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--delta", "1.5"], "--delta"),
        (["train", "--epsilon", "0"], "--epsilon"),
        (["train", "--no-such-option"], "unrecognized"),
        (["fly"], "invalid choice"),
        (["epsilon", "--sigma", "1.0", "--epochs", "1"], "--batch-size"),
        (["epsilon", "--sigma", "1.0", "--batch-size", "10", "--epochs", "1"], "--dataset-size"),
        (["epsilon", "--sigma", "-1", "--sample-rate", "0.1", "--steps", "10"], "noise_multiplier"),
        (["epsilon", "--sigma", "1", "--sample-rate", "1.5", "--steps", "10"], "sample_rate"),
    ],
)
def test_unknown_or_out_of_range_option_values(argv, needle, capsys):
    assert main(argv) == 2
    _assert_one_error_line(capsys, needle)


def test_local_dataset_without_data_dir(capsys):
    assert main(["train", "--dataset", "mnist"]) == 2
    _assert_one_error_line(capsys, "--data-dir")


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_missing_or_empty_data_dir(dataset, tmp_path, capsys):
    assert main(["train", "--dataset", dataset, "--data-dir", str(tmp_path / "nope")]) == 2
    _assert_one_error_line(capsys, "--data-dir")
    assert main(["train", "--dataset", dataset, "--data-dir", str(tmp_path)]) == 2
    _assert_one_error_line(capsys, "--data-dir")


def test_unreadable_data_file(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"garbage!")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    _assert_one_error_line(capsys, "idx")


def test_unreachable_epsilon(tmp_path, capsys):
    assert main([*BASE, "--epsilon", "1e-9", "--out", str(tmp_path / "r")]) == 2
    _assert_one_error_line(capsys, "unreachable")


def test_batch_larger_than_the_training_set(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--batch-size", "5000",
                 "--out", str(tmp_path / "r")]) == 2
    _assert_one_error_line(capsys, "--batch-size")


def test_text_model_on_image_data_is_refused(capsys):
    assert main(["train", "--dataset", "digits", "--model", "gpt"]) == 2
    _assert_one_error_line(capsys, "--model")


def test_out_folder_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert main([*BASE, "--out", str(out)]) == 2
    _assert_one_error_line(capsys, "--resume")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(capsys):
    assert main(["train", "--dataset", "digits", "--device", "cuda"]) == 2
    _assert_one_error_line(capsys, "cuda")


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        ("epochs: [1, 2\n", ".yaml", "not valid"),
        ("epochs = \n", ".toml", "not valid"),
        ("learning_rate: 0.1\n", ".yaml", "unknown option"),
        ("epochs: ten\n", ".yaml", "epochs"),
        ("model: alexnet\n", ".yaml", "alexnet"),
        ("- 1\n- 2\n", ".yaml", "mapping"),
    ],
)
def test_bad_config_file(content, suffix, needle, tmp_path, capsys):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(content)
    assert main(["train", "--config", str(cfg)]) == 2
    _assert_one_error_line(capsys, needle)


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    _assert_one_error_line(capsys, "--config")
