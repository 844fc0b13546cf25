"""The examples/ scripts run end to end (a few DP steps each) and report ε."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_gpt2_example_takes_dp_steps():
    report = _load("hf_lora_gpt2").main(["--max-steps", "3", "--layers", "1", "--width", "32"])
    assert report["steps"] == 3 and 0 < report["epsilon"] <= 8.0


def test_bert_classifier_example_takes_dp_steps():
    report = _load("hf_bert_classifier").main(["--max-steps", "3", "--batch-size", "64"])
    assert report["steps"] == 3 and 0 < report["epsilon"] <= 8.0
    assert 0.0 <= report["test_accuracy"] <= 1.0
