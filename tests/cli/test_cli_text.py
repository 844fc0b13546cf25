"""`swiftdp train --dataset text`: a byte-level causal LM on a local file, reported by perplexity."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch
import transformers as tf
import yaml

import swiftdp.cli.train as train_module
from swiftdp.cli.main import main
from swiftdp.cli.options import TEXT_RECIPE, resolve
from swiftdp.data import load_dataset

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. ",
    "A journey of a thousand miles begins with a single step. ",
    "Privacy is protected one block of text at a time. ",
    "Small models learn the common letters first, then the words. ",
)
SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("".join(SENTENCES) * 12)  # 2.6 KB: 79 blocks of 32 bytes, 71 for training
    return path


def _args(corpus, *extra):
    return ["train", "--dataset", "text", "--data-file", str(corpus), "--seq-len", str(SEQ_LEN),
            "--epochs", "1", "--batch-size", "32", "--seed", "0", "--accountant", "rdp",
            "--quiet", *extra]


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("swiftdp: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def gpt_tiny_run(corpus, tmp_path_factory):
    """A private two-epoch run (2 steps per epoch) and what it printed."""
    out = tmp_path_factory.mktemp("runs") / "gpt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_args(corpus, "--epochs", "2", "--out", str(out))) == 0
    return out, printed.getvalue()


def test_gpt_tiny_run_reports_a_finite_perplexity_within_the_budget(gpt_tiny_run):
    out, printed = gpt_tiny_run
    for key in ("test perplexity", "bits per byte", "epsilon", "delta", "sigma"):
        assert key in printed, printed
    assert "accuracy" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["steps"] for e in metrics["epochs"]] == [2, 4]  # floor(71 / 32) per epoch
    assert set(metrics["epochs"][-1]) >= {"loss", "train_perplexity", "test_perplexity",
                                          "epsilon", "steps"}
    assert metrics["metric"] == "perplexity" and metrics["higher_is_better"] is False
    final = metrics["final"]
    assert math.isfinite(final["test_perplexity"]) and 1 < final["test_perplexity"]
    assert 0 < final["epsilon"] <= 3.0 and final["epsilon"] == metrics["epochs"][-1]["epsilon"]
    assert final["delta"] == 1e-5 and final["noise_multiplier"] > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "gpt-tiny" and config["optimizer"] == "adam"  # the text recipe
    assert config["seq_len"] == SEQ_LEN and config["derived"]["train_size"] == 71
    assert (out / "perplexity_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_reported_perplexity_is_exp_of_the_mean_token_cross_entropy_of_the_saved_model(
        gpt_tiny_run, corpus):
    out, _ = gpt_tiny_run
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["task"] == "language-modelling" and saved["seq_len"] == SEQ_LEN
    model = tf.GPT2LMHeadModel(tf.GPT2Config.from_dict(saved["config"]))
    model.load_state_dict(saved["state_dict"])
    test = load_dataset("text", data_file=corpus, seq_len=SEQ_LEN).test.x
    with torch.no_grad():
        # the model's own loss: one token mean over every predicted position of the split
        mean_nll = model.eval()(input_ids=test, labels=test).loss.item()
    reported = json.loads((out / "metrics.json").read_text())["final"]["test_perplexity"]
    assert reported == pytest.approx(math.exp(mean_nll), rel=1e-5)


def test_hf_config_model_trains_the_same_way(corpus, tmp_path):
    tf.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                   ).save_pretrained(tmp_path / "llama")
    out = tmp_path / "run"
    assert main(_args(corpus, "--model", f"hf:{tmp_path / 'llama' / 'config.json'}", "--out",
                      str(out))) == 0
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert math.isfinite(final["test_perplexity"]) and final["epsilon"] <= 3.0
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["config"]["model_type"] == "llama" and saved["config"]["vocab_size"] == 260


def test_non_private_text_baseline_with_validation(corpus, tmp_path):
    out = tmp_path / "np"
    assert main(_args(corpus, "--non-private", "--validation", "--out", str(out))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["private"] is False and metrics["eval_split"] == "validation"
    assert math.isfinite(metrics["final"]["validation_perplexity"])


def test_interrupted_text_run_resumes_to_the_uninterrupted_result(gpt_tiny_run, corpus, tmp_path,
                                                                   monkeypatch):
    full, _ = gpt_tiny_run
    part = tmp_path / "part"

    def interrupt(step):
        if step == 3:  # in epoch 2: resumes from the checkpoint of epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_after_step", interrupt)
    assert main(_args(corpus, "--epochs", "2", "--out", str(part))) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(part), "--quiet"]) == 0
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    assert [e["test_perplexity"] for e in a["epochs"]] == [e["test_perplexity"] for e in b["epochs"]]
    assert a["final"]["epsilon"] == b["final"]["epsilon"]
    first = torch.load(full / "model.pt", weights_only=False)["state_dict"]
    second = torch.load(part / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_help_states_the_privacy_unit_and_the_text_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the help's words
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ONE BLOCK IS ONE EXAMPLE" in text and "--seq-len" in text
    assert "text: adam" in text and "text: gpt-tiny" in text


def test_text_recipe_defaults_yield_to_the_config_file_and_the_command_line():
    cfg = resolve({"dataset": "text", "data_file": "x.txt"}, {})
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.max_grad_norm, cfg.epochs) == (
        "gpt-tiny", "adam", TEXT_RECIPE["lr"], TEXT_RECIPE["max_grad_norm"], TEXT_RECIPE["epochs"])
    cfg = resolve({"lr": 0.01}, {"dataset": "text", "data_file": "x.txt", "optimizer": "sgd"})
    assert (cfg.lr, cfg.optimizer, cfg.model) == (0.01, "sgd", "gpt-tiny")
    images = resolve({}, {})
    assert (images.lr, images.optimizer, images.model) == (4.0, "sgd", "cnn")


# -- errors: one line, exit code 2, before any training ------------------------------------


def test_text_without_data_file(capsys):
    assert main(["train", "--dataset", "text"]) == 2
    _one_error_line(capsys, "--data-file PATH")


def test_missing_or_too_short_data_file(tmp_path, capsys):
    assert main(["train", "--dataset", "text", "--data-file", str(tmp_path / "nope.txt")]) == 2
    _one_error_line(capsys, "--data-file", "nope.txt", "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["train", "--dataset", "text", "--data-file", str(short)]) == 2
    _one_error_line(capsys, "--data-file", "9 bytes", "--seq-len")


def test_hf_config_that_does_not_exist(corpus, tmp_path, capsys):
    assert main(_args(corpus, "--model", f"hf:{tmp_path / 'none' / 'config.json'}")) == 2
    _one_error_line(capsys, "--model", "does not exist")
    assert main(_args(corpus, "--model", f"hf:{tmp_path}")) == 2
    _one_error_line(capsys, "--model", "has no config.json")


def test_hf_config_whose_vocabulary_is_too_small(corpus, tmp_path, capsys):
    tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    assert main(_args(corpus, "--model", f"hf:{tmp_path}")) == 2
    _one_error_line(capsys, "vocab_size=100", "257")


def test_hf_config_with_too_few_positions(corpus, tmp_path, capsys):
    tf.GPT2Config(vocab_size=257, n_positions=16, n_embd=32, n_layer=1, n_head=2
                  ).save_pretrained(tmp_path)
    assert main(_args(corpus, "--model", f"hf:{tmp_path}")) == 2
    _one_error_line(capsys, "max_position_embeddings=16", "--seq-len 15")


def test_hf_config_that_is_not_a_causal_lm(corpus, tmp_path, capsys):
    tf.T5Config(vocab_size=300, d_model=32, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    assert main(_args(corpus, "--model", f"hf:{tmp_path}")) == 2
    _one_error_line(capsys, "no causal LM", "model_type='t5'")


def test_hf_without_transformers_names_the_extra(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    assert main(_args(corpus, "--model", f"hf:{tmp_path}")) == 2
    _one_error_line(capsys, "transformers", "[hf]")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--dataset", "text", "--data-file", "x.txt", "--model", "cnn"], ("--model 'cnn'",
                                                                           "gpt-tiny")),
        (["--dataset", "digits", "--model", "gpt-tiny"], ("--model 'gpt-tiny'", "--dataset text")),
        (["--dataset", "digits", "--data-file", "x.txt"], ("--data-file", "--dataset text")),
        (["--model", "gpt-huge"], ("--model", "hf:path/to/config.json")),
        (["--dataset", "text", "--data-file", "x.txt", "--seq-len", "0"], ("--seq-len",)),
    ],
)
def test_options_that_do_not_fit_together(argv, needles, capsys):
    assert main(["train", *argv]) == 2
    _one_error_line(capsys, *needles)
