"""The noise, clipping and averaging options of `swiftdp train`: flags, config keys, refusals.

Everything here is refused or resolved before any data is loaded, except the
last group, which needs the planned steps (the data, the model and
`make_private`) and trains nothing.
"""

from __future__ import annotations

import pytest

from swiftdp.cli import rundir
from swiftdp.cli.main import build_parser, main
from swiftdp.cli.options import read_config_file, resolve
from swiftdp.cli.train_command import _requested

BASE = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "256",
        "--seed", "0", "--accountant", "gdp", "--quiet"]

FLAGS = ["--noise-multiplier", "1.5", "--noise-schedule", "exp:0.990:0.5", "--adaptive-clipping",
         "0.6", "--max-grad-norm", "0.2", "--ema", "0.95", "--ema-warmup", "--accountant", "gdp"]
YAML = ("noise-multiplier: 1.5\nnoise_schedule: exp:0.99:0.5\nadaptive_clipping: 0.6\n"
        "max_grad_norm: 0.2\nema: 0.95\nema-warmup: true\naccountant: gdp\n")
TOML = ('noise_multiplier = 1.5\nnoise-schedule = "exp:0.99:0.5"\nadaptive_clipping = "0.6"\n'
        'max_grad_norm = 0.2\nema = 0.95\nema_warmup = true\naccountant = "gdp"\n')


def _resolved(argv, config=None):
    args = build_parser().parse_args(["train", *argv, *(["--config", str(config)] if config
                                                        else [])])
    cli, file_values = _requested(args)
    return resolve(cli, file_values)


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML), (".toml", TOML)])
def test_flags_and_config_file_keys_resolve_to_the_same_run(tmp_path, suffix, text):
    config = tmp_path / f"opts{suffix}"
    config.write_text(text)
    from_flags, from_file = _resolved(FLAGS), _resolved([], config)
    assert from_flags == from_file
    assert (from_flags.noise_multiplier, from_flags.noise_schedule, from_flags.adaptive_clipping,
            from_flags.ema, from_flags.ema_warmup, from_flags.polyak, from_flags.accountant) == \
        (1.5, "exp:0.99:0.5", "0.6:0.2", 0.95, True, None, "gdp")


def test_sigma_is_an_alias_of_noise_multiplier():
    assert _resolved(["--sigma", "0.7"]).noise_multiplier == 0.7


def test_a_run_config_with_every_new_key_reads_back_to_the_same_run(tmp_path):
    for argv in (FLAGS, ["--noise-multiplier", "2", "--clip-schedule", "step:10:0.5",
                         "--polyak", "3"]):
        cfg = _resolved(argv)
        rundir.write_config(tmp_path, cfg.to_dict(), {"noise_multiplier": 1.0})
        assert resolve({}, read_config_file(tmp_path / rundir.CONFIG)) == cfg


def test_polyak_replaces_the_ema_chosen_on_a_lower_level(tmp_path):
    cfg = _resolved(["--polyak", "3"])
    assert (cfg.ema, cfg.polyak) == (0.0, 3)  # the recipe's EMA gives way
    file = tmp_path / "opts.yaml"
    file.write_text("polyak: 4\n")
    cfg = _resolved(["--ema", "0.8"], file)  # the command line's choice wins
    assert (cfg.ema, cfg.polyak) == (0.8, None)
    file.write_text("ema: 0.99\n")
    cfg = _resolved(["--polyak", "2"], file)
    assert (cfg.ema, cfg.polyak) == (0.0, 2)
    text = _resolved(["--dataset", "text", "--polyak", "1"])  # the text recipe has an EMA
    assert (text.ema, text.polyak) == (0.0, 1)


def _one_error_line(capsys, *needles):
    # GDP's warning (an approximation, not a bound) may come first, on its own line.
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("swiftdp: warning: accountant 'gdp'"))
    assert err.startswith("swiftdp: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(("extra", "needles"), [
    (["--noise-schedule", "linear:0.9"],
     ["--noise-schedule 'linear:0.9'", "exp:GAMMA[:MIN] or step:SIZE:GAMMA"]),
    (["--noise-multiplier", "1", "--noise-schedule", "exp:0"],
     ["--noise-schedule 'exp:0'", "GAMMA must be > 0"]),
    (["--clip-schedule", "step:0:0.5"], ["--clip-schedule 'step:0:0.5'", "SIZE"]),
    (["--adaptive-clipping", "1.5"], ["--adaptive-clipping '1.5'", "QUANTILE must be in (0, 1)"]),
    (["--adaptive-clipping", "0.5:0.2:0"], ["--adaptive-clipping", "COUNT_NOISE must be > 0"]),
    (["--noise-multiplier", "0"], ["--noise-multiplier expects a finite number > 0, got 0.0"]),
    (["--sigma", "-1"], ["--noise-multiplier expects a finite number > 0, got -1.0"]),
    (["--polyak", "-1"], ["--polyak expects an integer >= 0, got -1"]),
    (["--polyak", "1.5"], ["--polyak: invalid int value"]),
    (["--ema", "1"], ["--ema expects a number in [0, 1), got 1.0"]),
    (["--accountant", "gauss"], ["--accountant", "invalid choice", "gdp"]),
    (["--noise-schedule", "exp:0.9"],
     ["--noise-schedule exp:0.9 needs the first step's σ", "add --noise-multiplier SIGMA"]),
    (["--clip-schedule", "exp:0.9", "--adaptive-clipping", "0.5"],
     ["--clip-schedule exp:0.9 and --adaptive-clipping 0.5:0.2", "choose one"]),
    (["--adaptive-clipping", "0.5", "--clipping", "automatic"],
     ["--adaptive-clipping 0.5:0.2", "--clipping automatic", "Use --clipping flat"]),
    (["--ema", "0.9", "--polyak", "3"], ["--ema 0.9 and --polyak 3", "choose one"]),
    (["--ema-warmup", "--ema", "0"], ["--ema-warmup", "(--ema 0)", "--ema DECAY"]),
    (["--ema-warmup", "--polyak", "2"], ["--ema-warmup", "--polyak 2 averages instead"]),
    (["--non-private", "--noise-multiplier", "1"], ["--noise-multiplier 1.0", "--non-private"]),
    (["--non-private", "--adaptive-clipping", "0.5"],
     ["--adaptive-clipping 0.5:0.2", "drop --non-private"]),
])
def test_bad_values_and_combinations_are_refused_before_any_work(tmp_path, capsys, extra,
                                                                 needles):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out), *extra]) == 2
    _one_error_line(capsys, *needles)
    assert not out.exists()


@pytest.mark.parametrize(("content", "needles"), [
    ("noise_schedule: exp:-1\n", ["--config c.yaml: noise_schedule 'exp:-1'", "GAMMA"]),
    ("adaptive_clipping: 2\n", ["--config c.yaml: adaptive_clipping '2'", "QUANTILE"]),
    ("adaptive_clipping: [0.5]\n", ["adaptive_clipping expects a text"]),
    ("polyak: 2\nema: 0.9\n", ["--config: ema 0.9 and polyak 2", "choose one"]),
    ("ema_warmup: yes please\n", ["ema_warmup expects true or false"]),
])
def test_bad_config_file_values_are_refused(tmp_path, capsys, content, needles):
    config = tmp_path / "c.yaml"
    config.write_text(content)
    assert main([*BASE, "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, *needles)


@pytest.mark.parametrize(("extra", "needles"), [
    # A given σ whose planned steps overspend (GDP: ε grows without bound as σ falls).
    (["--noise-multiplier", "0.3"],
     ["--noise-multiplier 0.3 would spend ε =", "over the 5 planned steps", "--epsilon 3",
      "raise --noise-multiplier"]),
    (["--noise-multiplier", "1", "--noise-schedule", "step:2:0.7"],
     ["--noise-schedule step:2:0.7 from --noise-multiplier 1 (--epsilon 3)",
      "would spend epsilon=7.58", "a larger --noise-multiplier"]),
    # so small a σ: an astronomically large ε (GDP's closed form no longer overflows)
    (["--noise-multiplier", "1", "--noise-schedule", "step:2:0.2"],
     ["--noise-schedule step:2:0.2", "would spend epsilon="]),
    (["--clip-schedule", "exp:1e-200"],
     ["--clip-schedule exp:1e-200 from --max-grad-norm 0.1 gives C = 0.0 at step 2",
      "exp:GAMMA:MIN"]),
    (["--adaptive-clipping", "0.5:0.2:0.1"],
     ["--adaptive-clipping 0.5:0.2:0.1:", "count_noise=0.1 is too small", "COUNT_NOISE"]),
    (["--noise-multiplier", "2", "--noise-schedule", "exp:4", "--epsilon", "100",
      "--adaptive-clipping", "0.5:0.2:3"],
     ["--adaptive-clipping 0.5:0.2:3:", "count_noise=3 is too small for noise_multiplier=512",
      "COUNT_NOISE"]),
    (["--polyak", "5"], ["--polyak 5 averages the weights after step 5", "the run has 5 steps",
                         "START below 5"]),
])
def test_runs_that_would_fail_or_overspend_later_are_refused_before_the_first_step(
        tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out), *extra]) == 2
    _one_error_line(capsys, *needles)
    assert not (out / rundir.CHECKPOINT).exists()
