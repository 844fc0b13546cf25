"""The CIFAR-10 WRN-16-4 recipe file (De et al. 2022) runs end to end on a small fake CIFAR folder.

The real run needs the CIFAR-10 folder and a GPU; here the recipe's every
option (augmentation multiplicity with crop-flip, physical chunks, EMA with
warm-up, the WRN-16-4 zoo model) is exercised with the size overridden.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import yaml

from swiftdp.cli.main import main

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "recipes" / "cifar10-wrn16-4.yaml"


def _fake_cifar(root: Path, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, per_batch))}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
    return folder


def test_the_recipe_file_holds_de_et_al_settings():
    cfg = yaml.safe_load(RECIPE.read_text())
    assert (cfg["model"], cfg["augmult"], cfg["augment"], cfg["batch_size"]) == (
        "wrn-16-4", 16, "crop-flip", 4096)
    assert (cfg["epsilon"], cfg["max_grad_norm"], cfg["lr"], cfg["momentum"]) == (8.0, 1.0, 4.0, 0.0)
    assert cfg["ema"] == 0.999 and cfg["ema_warmup"] is True


def test_the_recipe_runs_on_a_fake_cifar_folder_with_its_size_overridden(tmp_path):
    data = _fake_cifar(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--data-dir", str(data), "--epochs", "1",
                 "--batch-size", "8", "--augmult", "2", "--max-physical-batch-size", "4",
                 "--seed", "0", "--quiet", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"], config["augmult"], config["augment"]) == ("wrn-16-4", 2, "crop-flip")
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["epsilon"] <= 8.0
