"""The options of ``swiftdp train``: one table for the command line and config files.

Every option is declared once in :data:`TRAIN_OPTIONS`. The resolved value of
an option is, by priority: the command line, then the ``--config`` file
(YAML or TOML, keys spelt like the options with ``-`` or ``_``), then the
dataset's recipe (:data:`RECIPES`: ``--dataset text`` trains a language
model with its own defaults), then the default. Every value is checked here,
in one place, and a bad one raises :class:`~swiftdp.errors.InvalidArgumentError`
naming the option; so do options that do not fit together
(:func:`check_combination`). The schedules of σ and C and adaptive clipping
are one string each (``exp:0.99``, ``step:100:0.5``, ``0.5:0.2``), checked
and written canonically by :mod:`swiftdp.cli.specs`.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from swiftdp.accounting import MECHANISMS
from swiftdp.cli.specs import SpecError, parse_adaptive, parse_schedule
from swiftdp.clipping.clip_fns import CLIPPING_STYLES
from swiftdp.clipping.engine import MODES
from swiftdp.data import DATASETS, DEFAULT_SEQ_LEN, TEXT_DATASETS
from swiftdp.errors import InvalidArgumentError
from swiftdp.models import IMAGE_MODELS, SIZES
from swiftdp.models.causal_lm import CAUSAL_LMS, HF_PREFIX, is_causal_lm

OPTIMIZERS = ("sgd", "adam")
AUGMENTS = ("auto", "none", "crop", "crop-flip")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """The resolved options of one ``swiftdp train`` run (see :data:`TRAIN_OPTIONS`)."""

    dataset: str = "mnist5k"
    data_dir: str | None = None
    data_file: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    model: str = "cnn"
    model_size: str = "small"
    epsilon: float = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    noise_schedule: str | None = None
    epochs: int = 15
    batch_size: int | None = None
    max_grad_norm: float = 0.1
    clip_schedule: str | None = None
    adaptive_clipping: str | None = None
    clip_per_layer: bool = False
    lr: float = 4.0
    momentum: float = 0.9
    optimizer: str = "sgd"
    clipping: str = "flat"
    mode: str = "bk"
    accountant: str = "pld"
    ema: float = 0.9
    ema_warmup: bool = False
    polyak: int | None = None
    max_physical_batch_size: int | None = None
    augmult: int = 1
    augment: str = "auto"
    seed: int | None = None
    secure: bool = False
    audit: bool = False
    audit_inputs: int = 0
    device: str = "cpu"
    threads: int | None = None
    nproc: int = 1
    non_private: bool = False
    validation: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, keys as in config files (underscores)."""
        return asdict(self)


RUN_ONLY = ("device", "threads", "nproc")
"""Options that change how a run executes, not what it computes: free to change on resume."""

TEXT_RECIPE: dict[str, Any] = {
    "model": "gpt-tiny",
    "optimizer": "adam",
    "lr": 5e-3,
    "max_grad_norm": 1.0,
    "epochs": 20,
    "batch_size": None,
    "ema": 0.9,
}
"""The defaults of ``--dataset text`` that differ from the image recipe (see the README)."""

RECIPES: dict[str, dict[str, Any]] = {name: TEXT_RECIPE for name in TEXT_DATASETS}
"""Per-dataset defaults, between the global defaults and the config file."""


@dataclass(frozen=True)
class Option:
    """One option of ``swiftdp train``.

    Attributes:
        name: field of :class:`TrainConfig` (``--name-with-dashes`` on the command line).
        kind: ``int``, ``float``, ``str`` or ``bool`` (a flag).
        help: one line for ``--help``.
        choices: allowed values, for ``str`` options.
        check: ``(value) -> problem or None`` for numbers.
        nullable: whether ``None`` (``null`` in a file) is allowed.
        parse: ``(text) -> canonical text`` for ``str`` options written in a
            small syntax (:mod:`swiftdp.cli.specs`); raises ``SpecError``.
        metavar: the value's name in ``--help`` (default: the name in capitals).
        aliases: other command-line spellings (``--sigma``).
    """

    name: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False
    parse: Callable[[str], str] | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The command-line spelling, ``--batch-size``."""
        return "--" + self.name.replace("_", "-")


def _positive(v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else "a finite number > 0"


def _at_least_one(v: Any) -> str | None:
    return None if v >= 1 else "an integer >= 1"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "an integer >= 0"


def _unit_open(v: Any) -> str | None:
    return None if 0 < v < 1 else "a number in (0, 1)"


def _unit_left_closed(v: Any) -> str | None:
    return None if 0 <= v < 1 else "a number in [0, 1)"


MODEL_NAMES = (*IMAGE_MODELS, *CAUSAL_LMS)
"""``--model`` names besides ``hf:CONFIG``."""


def _model_name(v: Any) -> str | None:
    if v in MODEL_NAMES or v.startswith(HF_PREFIX):
        return None
    return f"one of {', '.join(MODEL_NAMES)} or {HF_PREFIX}path/to/config.json"


TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("dataset", str, "dataset (mnist/cifar10 read from --data-dir, text from --data-file)",
           DATASETS),
    Option("data_dir", str, "folder of a torchvision-format dataset, for mnist and cifar10 (never "
           "downloaded; default: none)",
           nullable=True),
    Option("data_file", str, "text file for --dataset text, read as bytes (256 byte ids and a "
           "start id) and cut into blocks of --seq-len bytes; ONE BLOCK IS ONE EXAMPLE, the "
           "unit the (ε, δ) guarantee protects (not one user or document); the last 10%% of "
           "the blocks are the test split (default: none)",
           nullable=True),
    Option("seq_len", int, "bytes per example (block) of --dataset text", check=_at_least_one),
    Option("model", str, "model: an image model of the zoo (cnn, cnn-classic, mlp, resnet-gn, "
           "vit-tiny), or for --dataset text a causal LM: gpt-tiny (GPT-2 layout, 2 layers, "
           "width 128) or hf:CONFIG (AutoModelForCausalLM.from_config of a local config.json "
           "or its folder; needs vocab_size >= 257; nothing downloaded)",
           check=_model_name),
    Option("model_size", str, "model size (ignored by hf:)", SIZES),
    Option("epsilon", float, "privacy budget ε: σ is calibrated to reach it, or, with "
           "--noise-multiplier, the cap that the planned steps must stay within",
           check=_positive),
    Option("delta", float, "δ of the (ε, δ) guarantee", check=_unit_open),
    Option("noise_multiplier", float, "noise multiplier σ instead of calibrating it to "
           "--epsilon (a run whose planned steps would spend more than --epsilon is refused "
           "before training); with --noise-schedule, the first step's σ (default: calibrated)",
           check=_positive, nullable=True, metavar="SIGMA", aliases=("--sigma",)),
    Option("noise_schedule", str, "σ per step, starting from --noise-multiplier (needed: a "
           "schedule is not calibrated): exp:GAMMA[:MIN] gives σ·GAMMA^t floored at MIN, "
           "step:SIZE:GAMMA gives σ·GAMMA^(t // SIZE), t the steps taken; the planned "
           "schedule must stay within --epsilon (checked before training and at every step) "
           "(default: none, one σ)",
           nullable=True, parse=parse_schedule, metavar="SPEC"),
    Option("epochs", int, "passes over the training data", check=_at_least_one),
    Option("batch_size", int, "expected (Poisson) batch size (default: min(1000, N/4))",
           check=_at_least_one, nullable=True),
    Option("max_grad_norm", float, "clipping norm C (the first step's, with --clip-schedule "
           "or --adaptive-clipping)", check=_positive),
    Option("clip_schedule", str, "C per step, starting from --max-grad-norm: exp:GAMMA[:MIN] "
           "or step:SIZE:GAMMA as for --noise-schedule (default: none, one C)",
           nullable=True, parse=parse_schedule, metavar="SPEC"),
    Option("adaptive_clipping", str, "QUANTILE[:LR[:COUNT_NOISE]]: after each step move C "
           "geometrically (learning rate LR, default 0.2) towards the QUANTILE of the "
           "per-example gradient norms, from a noised count (std COUNT_NOISE, default "
           "max(expected batch / 20, σ)) accounted with the gradient in the same σ; flat "
           "clipping only (Andrew et al. 2021) (default: none)",
           nullable=True, parse=parse_adaptive, metavar="SPEC"),
    Option("clip_per_layer", bool, "clip each layer's gradient on its own, to "
           "C/sqrt(layers) (He et al. 2022; sensitivity still C); with --adaptive-clipping "
           "each layer's threshold follows its own norms (default: one C for the model)"),
    Option("lr", float, "learning rate", check=_positive),
    Option("momentum", float, "SGD momentum", check=_unit_left_closed),
    Option("optimizer", str, "optimizer", OPTIMIZERS),
    Option("clipping", str, "clip function", CLIPPING_STYLES),
    Option("mode", str, "clipping engine mode (speed only)", MODES),
    Option("accountant", str, "privacy accountant (gdp: the central-limit approximation, "
           "which can under-state ε; the others are upper bounds)", MECHANISMS),
    Option("ema", float, "decay of the exponential moving average of the weights that is "
           "evaluated and saved (0: none, the last weights)",
           check=_unit_left_closed, metavar="DECAY"),
    Option("ema_warmup", bool, "ramp the EMA's decay up as min(DECAY, (1 + t) / (10 + t)) "
           "(De et al. 2022; default: the decay from the first step)"),
    Option("polyak", int, "evaluate and save the mean of the weights after steps START + 1, "
           "..., the last (Polyak averaging) instead of the EMA (default: none)",
           check=_non_negative, nullable=True, metavar="START"),
    Option("max_physical_batch_size", int, "split logical batches into chunks (memory only; default: "
           "no split)",
           check=_at_least_one, nullable=True),
    Option("augmult", int, "augmentation multiplicity: K augmented views of each example "
           "per step, their gradients averaged before clipping, so each example is still "
           "clipped once to C (De et al. 2022) (default: 1, no views)", check=_at_least_one,
           metavar="K"),
    Option("augment", str, "the augmentation of each view: crop (random shifts of 4 pixels "
           "on cifar10, 2 on mnist, 1 on digits), crop-flip (and horizontal flips), none; "
           "auto: crop-flip on cifar10 and crop on the digits with --augmult > 1, none "
           "otherwise", AUGMENTS),
    Option("seed", int, "seed of initialisation, sampling and noise (default: a "
           "secret random seed)",
           check=_non_negative, nullable=True),
    Option("secure", bool, "draw the noise and the sampling from the OS's secure generator "
           "(noise: a float64 sum of Gaussians per coordinate); checkpoints then hold no "
           "generator state and a resume draws fresh entropy (--seed still seeds the model's "
           "initialisation)"),
    Option("audit", bool, "after training, audit the run's mechanism (its σ, q, steps, "
           "clipping mode) in one run of the real pipeline with 1,000 gradient canaries: an "
           "empirical lower bound on ε beside the claimed one, in privacy.md/json and "
           "audit.png (swiftdp audit; one σ only)"),
    Option("audit_inputs", int, "insert M input-space canaries (random-pixel images with "
           "random labels, each kept with probability 1/2) into the training set and score "
           "them on the trained model: a black-box lower bound on ε of this very run, in "
           "privacy.md/json and audit_inputs.png (0: none)", check=_non_negative,
           metavar="M"),
    Option("device", str, "device", DEVICES),
    Option("threads", int, "CPU threads per process (default: all cores, shared evenly among "
           "the --nproc processes)", check=_at_least_one, nullable=True),
    Option("nproc", int, "processes to train on, data-parallel (torchrun, gloo on the CPU); "
           "--batch-size stays the global expected batch size, so σ, q and ε are those of "
           "one process", check=_at_least_one),
    Option("non_private", bool, "train without DP (the baseline: same recipe, no clipping "
           "or noise)"),
    Option("validation", bool, "train on 80%% of the training split and evaluate on the other "
           "20%% (text: its last 20%% of blocks) for choosing settings without touching the "
           "test split"),
)
OPTIONS_BY_NAME = {o.name: o for o in TRAIN_OPTIONS}
DEFAULTS = TrainConfig()


def recipe_defaults(dataset: str) -> dict[str, Any]:
    """The defaults in force for ``dataset``: the global ones, overridden by its recipe."""
    return {**DEFAULTS.to_dict(), **RECIPES.get(dataset, {})}


def check_value(option: Option, value: Any, source: str) -> Any:
    """Check (and convert) one value of ``option``; returns it.

    Args:
        option: the option.
        value: the value (already typed, from a file or argparse).
        source: where it came from, for the message (``"--lr"``, ``"config.yaml: lr"``).

    Raises:
        InvalidArgumentError: the value has the wrong type, is not a choice, or is out of range.
    """
    if value is None:
        if option.nullable:
            return None
        raise InvalidArgumentError(f"{source} must have a value, got null.")
    kind = option.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{source} expects true or false, got {value!r}.")
        return value
    if option.parse is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `adaptive_clipping: 0.5` in a YAML file
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{source} expects a text, got {value!r}.")
        try:
            return option.parse(value)
        except SpecError as e:
            raise InvalidArgumentError(f"{source} {value!r}: {e}.") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{source} expects a number, got {value!r}.") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgumentError(
            f"{source} expects {'an integer' if kind is int else 'a ' + kind.__name__}, "
            f"got {value!r}."
        )
    if option.choices is not None and value not in option.choices:
        raise InvalidArgumentError(
            f"{source}: invalid choice {value!r} (choose from {', '.join(option.choices)})."
        )
    if option.check is not None and (problem := option.check(value)) is not None:
        raise InvalidArgumentError(f"{source} expects {problem}, got {value!r}.")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``/``.json``) or TOML (``.toml``) file of options.

    Keys are option names (``batch-size`` or ``batch_size``); a top-level
    ``derived`` section (written by ``swiftdp train`` in a run folder's
    ``config.yaml``) is ignored, so a run's config can start a new run.

    Args:
        path: the file.

    Returns:
        ``{option name: checked value}``.

    Raises:
        InvalidArgumentError: unreadable file, bad syntax, unknown key or bad value.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidArgumentError(f"--config {str(path)!r}: cannot read ({e.strerror}).") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgumentError(f"--config {str(path)!r} is not valid: {first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"--config {str(path)!r} must hold a mapping of options.")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "derived":
            continue
        if name not in OPTIONS_BY_NAME:
            raise InvalidArgumentError(
                f"--config {str(path)!r}: unknown option {key!r} (known: "
                f"{', '.join(o.name for o in TRAIN_OPTIONS)})."
            )
        out[name] = check_value(OPTIONS_BY_NAME[name], value, f"--config {p.name}: {key}")
    return out


def resolve(command_line: Mapping[str, Any], file_values: Mapping[str, Any]) -> TrainConfig:
    """Merge defaults, file values and command-line values (highest priority last).

    Args:
        command_line: options given on the command line only.
        file_values: options from ``--config``.

    Returns:
        The :class:`TrainConfig`.

    Raises:
        InvalidArgumentError: a value is out of range.
    """
    dataset = command_line.get("dataset", file_values.get("dataset", DEFAULTS.dataset))
    merged = recipe_defaults(dataset)
    merged.update(file_values)
    given = {name: check_value(OPTIONS_BY_NAME[name], value, OPTIONS_BY_NAME[name].flag)
             for name, value in command_line.items()}
    merged.update(given)
    merged.update(_average_choice(given, file_values))
    cfg = TrainConfig(**{f.name: merged[f.name] for f in fields(TrainConfig)})
    check_combination(cfg)
    return cfg


def _average_choice(command_line: Mapping[str, Any], file_values: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """``--ema`` and ``--polyak``: the average chosen where it is chosen last.

    The two are one choice: the command line's (``--ema`` or ``--polyak``)
    replaces the config file's, and the Polyak mean is recorded as
    ``ema: 0, polyak: START`` (so a run's ``config.yaml`` reads back).

    Raises:
        InvalidArgumentError: a non-zero ``--ema`` and ``--polyak`` on the
            same level (both flags, or both keys of the file).
    """
    for values, (ema_name, polyak_name) in ((command_line, ("--ema", "--polyak")),
                                             (file_values, ("--config: ema", "polyak"))):
        ema, polyak = values.get("ema"), values.get("polyak")
        if polyak is not None:
            if ema:
                raise InvalidArgumentError(
                    f"{ema_name} {ema:g} and {polyak_name} {polyak} are two averages of the "
                    "weights; choose one: drop --ema for the Polyak mean (in a file, ema: 0), "
                    "or drop --polyak for the EMA.")
            return {"ema": 0.0, "polyak": polyak}
        if "ema" in values:
            return {"polyak": None}
    return {}


def check_combination(cfg: TrainConfig) -> None:
    """Refuse options that are valid alone but do not fit together.

    Raises:
        InvalidArgumentError: a language model on images or an image model on
            text, ``--data-file`` without ``--dataset text``, ``--nproc`` above 1
            with an option that runs in one process only, or a noise, clipping
            or averaging option that does not fit the others
            (:func:`_check_privacy_options`).
    """
    if cfg.nproc > 1 and cfg.non_private:
        raise InvalidArgumentError(
            f"--non-private cannot run on --nproc {cfg.nproc} processes: the non-private "
            "baseline trains in one process. Drop --nproc (or use --nproc 1), or drop "
            "--non-private."
        )
    if cfg.nproc > 1 and cfg.device != "cpu":
        raise InvalidArgumentError(
            f"--device {cfg.device} cannot run on --nproc {cfg.nproc} processes: they "
            "communicate with gloo on the CPU. Use --device cpu, or --nproc 1."
        )
    _check_privacy_options(cfg)
    text = cfg.dataset in TEXT_DATASETS
    if cfg.data_file is not None and not text:
        raise InvalidArgumentError(
            f"--data-file is read by --dataset text only, got --dataset {cfg.dataset}; add "
            "--dataset text to train a language model on the file."
        )
    if text and not is_causal_lm(cfg.model):
        raise InvalidArgumentError(
            f"--model {cfg.model!r} takes images, but --dataset {cfg.dataset} trains a causal "
            f"language model: use --model {CAUSAL_LMS[0]} (the default for text) or "
            f"--model {HF_PREFIX}path/to/config.json."
        )
    if not text and is_causal_lm(cfg.model):
        raise InvalidArgumentError(
            f"--model {cfg.model!r} is a causal language model; it trains on --dataset text "
            f"--data-file PATH, not on --dataset {cfg.dataset}."
        )


DP_ONLY = ("noise_multiplier", "noise_schedule", "clip_schedule", "adaptive_clipping")
# (--clip-per-layer too: refused with --non-private in _check_privacy_options)
"""Options of DP-SGD's noise and clipping, which ``--non-private`` does not have."""


def _check_privacy_options(cfg: TrainConfig) -> None:
    """Refuse schedules, adaptive clipping and averaging options that do not fit together."""
    if cfg.non_private and cfg.clip_per_layer:
        raise InvalidArgumentError(
            "--clip-per-layer sets the clipping of DP-SGD, but --non-private trains without "
            "it: drop --clip-per-layer, or drop --non-private.")
    for name in DP_ONLY:
        value = getattr(cfg, name)
        if cfg.non_private and value is not None:
            flag = OPTIONS_BY_NAME[name].flag
            raise InvalidArgumentError(
                f"{flag} {value} sets the noise or clipping of DP-SGD, but --non-private "
                f"trains without either: drop {flag}, or drop --non-private.")
    if cfg.noise_schedule is not None and cfg.noise_multiplier is None:
        raise InvalidArgumentError(
            f"--noise-schedule {cfg.noise_schedule} needs the first step's σ: add "
            "--noise-multiplier SIGMA. A schedule is not calibrated to --epsilon, which caps "
            "it instead (the planned schedule is checked before training); `swiftdp epsilon "
            "--target-epsilon E ...` gives the constant σ of a budget, a start for SIGMA.")
    if cfg.clip_schedule is not None and cfg.adaptive_clipping is not None:
        raise InvalidArgumentError(
            f"--clip-schedule {cfg.clip_schedule} and --adaptive-clipping "
            f"{cfg.adaptive_clipping} both move C from step to step; choose one of them.")
    if cfg.audit and (cfg.non_private or cfg.noise_schedule is not None
                      or cfg.adaptive_clipping is not None):
        why = ("--non-private has no mechanism" if cfg.non_private else
               "the audit replays one σ, and --noise-schedule/--adaptive-clipping move it")
        raise InvalidArgumentError(f"--audit: {why}. Drop --audit, or audit with swiftdp audit.")
    text = cfg.dataset in TEXT_DATASETS
    if cfg.audit_inputs and (cfg.audit_inputs < 10 or text or cfg.nproc > 1):
        why = ("needs at least 10 canaries" if cfg.audit_inputs < 10 else
               "input canaries are images with random labels, for the image datasets (a text "
               "run can use --audit)" if text else
               "the canaries are scored in one process; use --nproc 1")
        raise InvalidArgumentError(f"--audit-inputs {cfg.audit_inputs}: {why}.")
    if cfg.clip_per_layer and cfg.clip_schedule is not None:
        raise InvalidArgumentError(
            f"--clip-schedule {cfg.clip_schedule} moves one C, and --clip-per-layer clips "
            "each layer to its own: choose one of them (--adaptive-clipping adapts each "
            "layer's threshold).")
    if cfg.adaptive_clipping is not None and cfg.clipping != "flat":
        raise InvalidArgumentError(
            f"--adaptive-clipping {cfg.adaptive_clipping} moves the threshold of --clipping "
            f"flat; --clipping {cfg.clipping} has none to adapt. Use --clipping flat, or drop "
            "--adaptive-clipping.")
    if (cfg.augmult > 1 or cfg.augment not in ("auto", "none")) and cfg.dataset in TEXT_DATASETS:
        raise InvalidArgumentError(
            f"--augmult {cfg.augmult} --augment {cfg.augment}: the augmentations are for "
            f"images, and --dataset {cfg.dataset} is text. Drop them.")
    if cfg.ema_warmup and cfg.ema == 0:
        why = f"--polyak {cfg.polyak} averages instead" if cfg.polyak is not None else "--ema 0"
        raise InvalidArgumentError(
            f"--ema-warmup ramps up the EMA's decay, but there is no EMA ({why}): drop "
            "--ema-warmup, or average with --ema DECAY.")


def conflicts(saved: TrainConfig, requested: Mapping[str, Any]) -> list[str]:
    """The requested options that differ from a saved run's (run-only options excepted).

    Args:
        saved: the run's configuration.
        requested: options given for the resumed invocation.

    Returns:
        ``"--lr 2.0 (the run has 4.0)"`` strings; empty when compatible.
    """
    out = []
    saved_d = saved.to_dict()
    for name, value in requested.items():
        if name in RUN_ONLY:
            continue
        if saved_d[name] != value:
            out.append(f"{OPTIONS_BY_NAME[name].flag} {value!r} (the run has {saved_d[name]!r})")
    return out
