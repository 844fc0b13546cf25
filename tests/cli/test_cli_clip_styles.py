"""`swiftdp train --augmult K --augment KIND` and `--clip-per-layer`: reach the engine and the run folder."""

from __future__ import annotations

import json

import pytest
import yaml

from swiftdp.cli.main import main
from swiftdp.cli.options import TrainConfig
from swiftdp.cli.privacy import augment_for

TINY = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "256",
        "--seed", "0", "--quiet"]


@pytest.mark.parametrize("extra", [["--augmult", "3"], ["--augmult", "2", "--non-private"],
                                   ["--augment", "crop"]])
def test_a_run_with_views_trains_and_records_them(tmp_path, extra):
    out = tmp_path / "run"
    assert main([*TINY, *extra, "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    k = int(extra[1]) if extra[0] == "--augmult" else 1
    assert config["augmult"] == k
    assert config["augment"] == ("crop" if "crop" in extra else "auto")
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["epochs"][-1]["train_accuracy"] <= 1.0


def test_auto_augmentation_is_none_without_views_and_by_dataset_with_them():
    assert augment_for(TrainConfig()) is None  # the default recipe is unchanged
    assert augment_for(TrainConfig(augmult=4)) is not None
    assert augment_for(TrainConfig(augmult=4, augment="none")) is None


def test_views_of_text_are_refused(tmp_path, capsys):
    assert main(["train", "--dataset", "text", "--augmult", "2", "--quiet",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--augmult 2" in err and "text" in err


def test_augmult_below_one_is_refused(tmp_path, capsys):
    assert main([*TINY, "--augmult", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--augmult expects an integer >= 1" in capsys.readouterr().err


def test_per_layer_clipping_trains_with_one_group_per_layer_and_total_sensitivity_c(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--clip-per-layer", "--adaptive-clipping", "0.5", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["clip_per_layer"] is True
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["first_max_grad_norm"] == pytest.approx(0.1)  # sqrt(sum C_k^2) = C


@pytest.mark.parametrize(("extra", "needle"), [
    (["--clip-per-layer", "--clip-schedule", "exp:0.9"], "choose one of them"),
    (["--clip-per-layer", "--non-private"], "drop --clip-per-layer"),
])
def test_per_layer_clipping_combinations_are_refused(tmp_path, capsys, extra, needle):
    assert main([*TINY, *extra, "--out", str(tmp_path / "r")]) == 2
    assert needle in capsys.readouterr().err


def test_augmented_views_go_through_the_frozen_features_not_their_cache():
    """The default cnn caches its ScatterNet features; augmenting them would shift 7x7 maps."""
    from swiftdp.cli.setup import prepare

    plain = prepare(TrainConfig(dataset="digits", seed=0))
    views = prepare(TrainConfig(dataset="digits", seed=0, augmult=2))
    assert plain.train.x.shape[1:] != (1, 8, 8)  # cached features
    assert views.train.x.shape[1:] == (1, 8, 8)  # the images, augmented at each step
    assert sum(p.numel() for p in views.trainable.parameters() if p.requires_grad) == sum(
        p.numel() for p in plain.trainable.parameters() if p.requires_grad)
