"""``swiftdp train``: resolve the options, prepare, train, report; resume, Ctrl-C, ``--nproc``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import swiftdp
from swiftdp import distributed
from swiftdp.cli import canaries, parallel, report, rundir
from swiftdp.cli.options import (
    OPTIONS_BY_NAME,
    RECIPES,
    RUN_ONLY,
    TRAIN_OPTIONS,
    TrainConfig,
    check_value,
    conflicts,
    read_config_file,
    resolve,
)
from swiftdp.cli.privacy import averaging_text, total_clip
from swiftdp.cli.setup import Prepared, prepare, set_threads
from swiftdp.cli.train import Trainer, metrics_document, run_epochs
from swiftdp.errors import InvalidArgumentError
from swiftdp.io import atomic_torch_save

EXIT_INTERRUPTED = 130


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Declare the ``train`` subcommand's options (defaults suppressed: only given ones appear)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "train", help="train a model with differential privacy (the main job)",
        description="Train with DP-SGD. With no option: the default recipe on the 5,000 "
                    "bundled MNIST digits (4,000 train / 1,000 test) at ε = 3, δ = 1e-5. "
                    "--dataset text --data-file PATH trains a byte-level causal language "
                    "model on a local text file (one example = one block of --seq-len "
                    "bytes) with the text recipe's defaults (shown as 'text:'), and reports "
                    "test perplexity per byte.",
        argument_default=argparse.SUPPRESS,
    )
    for o in TRAIN_OPTIONS:
        if o.kind is bool:
            p.add_argument(o.flag, *o.aliases, action="store_true", dest=o.name, help=o.help)
            continue
        default = getattr(TrainConfig(), o.name)
        text = o.help if "default:" in o.help else f"{o.help} (default: {default}"
        for dataset, recipe in RECIPES.items():
            if o.name in recipe and recipe[o.name] != default:
                text += f"; {dataset}: {recipe[o.name]}"
        text += "" if "default:" in o.help else ")"
        p.add_argument(o.flag, *o.aliases, dest=o.name, type=o.kind, choices=o.choices,
                       metavar=None if o.choices else o.metavar or o.name.upper(), help=text)
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of these options")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--out", metavar="DIR",
                   help="run folder (default: runs/<time>-<dataset>-<model>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _requested(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    # Checked and canonical (`exp:0.990` is `exp:0.99`), so --resume compares like with like.
    cli = {o.name: check_value(o, getattr(args, o.name), o.flag)
           for o in TRAIN_OPTIONS if hasattr(args, o.name)}
    file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
    return cli, file_values


def _resume_config(run_dir: Path, cli: dict[str, Any], file_values: dict[str, Any]) -> TrainConfig:
    saved_raw, _ = rundir.read_config(run_dir)
    try:
        saved = resolve({}, {k: check_value(OPTIONS_BY_NAME[k], v, f"{rundir.CONFIG}: {k}")
                             for k, v in saved_raw.items()})
    except KeyError as e:
        raise InvalidArgumentError(
            f"--resume {str(run_dir)!r}: {rundir.CONFIG} has an unknown option {e}; it was not "
            "written by this swiftdp."
        ) from None
    requested = {**file_values, **cli}
    bad = conflicts(saved, requested)
    if bad:
        raise InvalidArgumentError(
            f"--resume {str(run_dir)!r}: {bad[0]}; a resumed run keeps its settings (only "
            f"{', '.join('--' + n for n in RUN_ONLY)} may change). Start a new run instead."
        )
    if not (run_dir / rundir.CHECKPOINT).is_file():
        raise InvalidArgumentError(
            f"--resume {str(run_dir)!r} has no {rundir.CHECKPOINT}: nothing to resume."
        )
    return replace(saved, **{k: v for k, v in requested.items() if k in RUN_ONLY})


def _derived(trainer: Trainer) -> dict[str, Any]:
    prep = trainer.prep
    out: dict[str, Any] = {
        "train_size": len(prep.train), "eval_size": len(prep.evaluation),
        "eval_split": prep.eval_name, "batch_size": prep.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
        "planned_steps": trainer.steps_per_epoch * trainer.cfg.epochs,
        "trainable_parameters": sum(p.numel() for p in prep.trainable.parameters()
                                    if p.requires_grad),
        "swiftdp_version": swiftdp.__version__, "torch_version": str(torch.__version__),
    }
    if trainer.dp is not None:
        priv = trainer.dp.privacy
        out.update({k: v for k, v in priv.to_dict().items()
                    if k in ("noise_multiplier", "sample_rate", "expected_batch_size")})
        last = out["planned_steps"] - 1
        plan = trainer.plan
        if plan.noise_schedule is not None:
            out["planned_last_noise_multiplier"] = plan.noise_schedule(last)
        if plan.clip_schedule is not None:
            out["planned_last_max_grad_norm"] = plan.clip_schedule(last)
        if priv.adaptive is not None:
            out["adaptive_count_noise"] = priv.adaptive.count_noise
            out["gradient_noise_multiplier"] = priv.gradient_noise_multiplier()
    return out


def _summary(trainer: Trainer, wall: float) -> dict[str, Any]:
    last = trainer.history[-1] if trainer.history else {}
    task = trainer.prep.task
    value = last.get(trainer.eval_key, math.nan)
    final: dict[str, Any] = {trainer.eval_key: value,
                             "epochs": trainer.epoch, "steps": trainer.steps,
                             "wall_time_s": wall}
    rows = [(f"{trainer.prep.eval_name} {task.metric}", task.show(value))]
    if trainer.dp is not None:
        rows += _privacy_rows(trainer, final)
    else:
        rows += [("epsilon", "inf (non-private baseline)")]
    plural = "" if trainer.epoch == 1 else "s"
    rows += [("steps", f"{trainer.steps} ({trainer.epoch} epoch{plural})")]
    if trainer.dp is not None:
        rows += [("clip norm", _clip_text(trainer))]
    average = trainer.average
    rows += [("averaging", f"{averaging_text(average)} (evaluated and saved)")]
    final["averaging"] = None if average is None else {
        "kind": average.kind, "decay": average.decay, "warmup": average.warmup,
        "start_step": average.start_step, "updates": average.num_updates}
    wall_text = f"{wall:.1f} s"
    if trainer.elapsed_before and trainer.history:
        wall_text += f" (all sessions {trainer.history[-1]['elapsed_s']:.1f} s)"
    rows += [("wall time", wall_text), ("run folder", str(trainer.run_dir))]
    print()
    for key, value in rows:
        print(f"{key:<15} {value}")
    return final


def _privacy_rows(trainer: Trainer, final: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's ε, δ, σ and q rows; adds the privacy figures to ``final``."""
    assert trainer.dp is not None
    cfg, priv = trainer.cfg, trainer.dp.privacy
    sigmas = trainer.sigmas() or (priv.noise_multiplier, priv.noise_multiplier)
    clips = trainer.clip_norms()
    assert clips is not None
    final.update({"epsilon": trainer.epsilon(), "delta": priv.delta, "accountant": priv.accountant,
                  "noise_multiplier": sigmas[1], "first_noise_multiplier": sigmas[0],
                  "noise_schedule": cfg.noise_schedule, "sample_rate": priv.sample_rate,
                  "max_grad_norm": clips[1], "first_max_grad_norm": clips[0],
                  "clip_schedule": cfg.clip_schedule, "clipping": priv.clipping,
                  "adaptive_clipping": None if priv.adaptive is None else asdict(priv.adaptive)})
    goal = "budget" if cfg.noise_multiplier is not None else "target"
    caveat = ("; GDP is a central-limit approximation, not an upper bound"
              if priv.accountant == "gdp" else "")
    if cfg.noise_schedule is not None:
        sigma = (f"{sigmas[0]:.4f} at the first step, {sigmas[1]:.4f} at the last "
                 f"(--noise-schedule {cfg.noise_schedule})")
    else:
        how = "--noise-multiplier" if cfg.noise_multiplier is not None else "calibrated"
        sigma = f"{sigmas[0]:.4f} ({how})"
    if priv.adaptive is not None:  # of the last step: the counts take part of σ
        own = replace(priv, noise_multiplier=sigmas[1]).gradient_noise_multiplier()
        sigma += f"; the gradient's own σ_g = {own:.4f}"
    return [("epsilon", f"{trainer.epsilon():.4f} ({goal} {cfg.epsilon:g}, "
                        f"{priv.accountant.upper()} accountant{caveat})"),
            ("delta", f"{priv.delta:g}"),
            ("sigma", sigma),
            ("sampling rate", f"{priv.sample_rate:.4g} (expected batch "
                              f"{priv.expected_batch_size:g} of {trainer.dp.num_samples})")]


def _clip_text(trainer: Trainer) -> str:
    """The report's clip norm: C, or its first and last value and what moved it."""
    assert trainer.dp is not None
    cfg, adaptive = trainer.cfg, trainer.dp.privacy.adaptive
    clips = trainer.clip_norms()
    assert clips is not None
    if cfg.clip_schedule is None and adaptive is None:
        return f"{clips[0]:g} ({cfg.clipping})"
    if adaptive is not None:
        assert adaptive.count_noise is not None
        how = (f"adaptive: quantile {adaptive.target_quantile:g}, lr {adaptive.learning_rate:g}, "
               f"count noise {adaptive.count_noise:.4g}")
    else:
        how = f"--clip-schedule {cfg.clip_schedule}"
    return f"{clips[0]:g} at the first step, {clips[1]:.4g} at the last ({cfg.clipping}, {how})"


def _status(message: str) -> None:
    """A progress note on stdout (stderr is kept for the progress bars and errors)."""
    print(f"swiftdp: {message}", flush=True)


def _silent(message: str) -> None:
    del message


def run(args: argparse.Namespace, started: float, argv: Sequence[str]) -> int:
    """Run ``swiftdp train``; returns the exit code (0, or 130 when interrupted).

    With ``--nproc N > 1`` this process relaunches itself on N processes under
    torchrun and returns torchrun's exit code; a process torchrun started
    trains as one rank of the run (:mod:`swiftdp.cli.parallel`).

    Args:
        args: the parsed command line.
        started: when the command started (``time.time()``), for the wall time.
        argv: the command line ``args`` was parsed from (passed on to torchrun).
    """
    cli, file_values = _requested(args)
    resume = getattr(args, "resume", None)
    out = getattr(args, "out", None)
    run_dir: Path | None = None
    if resume is not None:
        if out is not None:
            raise InvalidArgumentError("--out cannot be combined with --resume (the run folder is "
                                       "RUN_DIR).")
        run_dir = Path(resume)
        cfg = _resume_config(run_dir, cli, file_values)
    else:
        cfg = resolve(cli, file_values)
        rundir.check_out(out)
    world = parallel.world_from_env()
    if world > 1:
        ranked = parallel.worker_config(cfg, cli.get("nproc"), world)
        distributed.exit_process(parallel.run_in_group(lambda: _train(args, ranked, run_dir, started)))
    if cfg.nproc > 1:
        if run_dir is not None:
            return parallel.launch(argv, cfg, run_dir, created=False)
        created = out is None or not Path(out).exists()
        run_dir = rundir.new_run_dir(out, cfg.dataset, cfg.model)
        return parallel.launch([*argv, "--out", str(run_dir)] if out is None else argv, cfg,
                               run_dir, created)
    return _train(args, cfg, run_dir, started)


def _train(args: argparse.Namespace, cfg: TrainConfig, resume_dir: Path | None,
           started: float) -> int:
    """Prepare, train and report in this process (one rank of a ``--nproc`` run, or alone).

    ``resume_dir`` is the folder to resume, or ``None`` for a new run. Only rank 0
    prints and writes the run folder; every rank saves and loads the checkpoint.
    """
    main_rank = parallel.is_main_rank()
    progress = not getattr(args, "quiet", False) and main_rank
    say = _status if progress else _silent
    set_threads(parallel.threads_per_process(cfg.threads, cfg.nproc))
    say(f"loading {cfg.dataset} and building model {cfg.model!r} ...")
    prep = prepare(cfg)
    inputs = None
    if cfg.audit_inputs:
        say(f"inserting {cfg.audit_inputs} input canaries (each kept with probability 1/2) ...")
        inputs = canaries.insert(prep, cfg.audit_inputs, cfg.seed)
    out = getattr(args, "out", None)
    run_dir = resume_dir if resume_dir is not None else parallel.on_rank0(
        lambda: rundir.new_run_dir(out, cfg.dataset, cfg.model), "create the run folder")
    if not cfg.non_private:
        what = ("calibrating the noise to" if cfg.noise_multiplier is None
                else "checking the noise against")
        say(f"{what} ε = {cfg.epsilon:g}, δ = {cfg.delta:g} over {cfg.epochs} epochs ...")
    trainer = Trainer(cfg, prep, run_dir)
    trainer.input_canaries = inputs
    if trainer.dp is not None:
        p = trainer.dp.privacy
        ranks = f" on {cfg.nproc} processes" if cfg.nproc > 1 else ""
        sigma = f"σ = {trainer.dp.optimizer.noise_multiplier:.4f}"
        sigma += f" ({cfg.noise_schedule})" if cfg.noise_schedule is not None else ""
        clip = f"C = {total_clip(trainer.dp.optimizer.initial_max_grad_norm):g}"
        groups = trainer.dp.clipper.group_limits
        clip += f" (per layer, {len(groups)} layers)" if groups else ""
        clip += f" ({cfg.clip_schedule})" if cfg.clip_schedule is not None else ""
        clip += " (adaptive)" if p.adaptive is not None else ""
        say(f"{len(prep.train)} training examples, expected batch {p.expected_batch_size:g} "
            f"(q = {p.sample_rate:.4g}), {trainer.steps_per_epoch * cfg.epochs} steps, "
            f"{sigma}, {clip}{ranks}")
    if resume_dir is not None:
        trainer.load(run_dir / rundir.CHECKPOINT)  # every rank (collective in a process group)
    else:
        config, derived = cfg.to_dict(), _derived(trainer)
        parallel.on_rank0(lambda: rundir.write_config(run_dir, config, derived),
                          "write config.yaml")
        trainer.save(0.0)  # epoch 0: --resume works even if the first epoch is interrupted
        first = metrics_document(trainer, None)
        parallel.on_rank0(lambda: rundir.write_metrics(run_dir, first), "write metrics.json")
    try:
        run_epochs(trainer, progress, started)
    except KeyboardInterrupt:
        if main_rank:
            print(f"\nswiftdp: interrupted; the checkpoint of epoch {trainer.saved_epoch} in "
                  f"{run_dir} is intact. Resume with: swiftdp train --resume {run_dir}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    wall = time.time() - started
    parallel.check_same_epsilon(trainer.epsilon())

    def finish() -> None:
        final = _summary(trainer, wall)
        atomic_torch_save(_model_file(cfg, prep, trainer), run_dir / rundir.MODEL)
        rundir.write_metrics(run_dir, metrics_document(trainer, final))
        report.write_privacy_report(trainer)
        if trainer.history:
            rundir.plot_metric(run_dir, trainer.history, prep.eval_name, prep.task.metric,
                               trainer.dp is not None)

    parallel.on_rank0(finish, "write the report, model.pt, metrics.json, privacy.json/md and "
                      "the plot")
    return 0


def _model_file(cfg: TrainConfig, prep: Prepared, trainer: Trainer) -> dict[str, Any]:
    """The content of ``model.pt``: what rebuilds the evaluated model, and its weights.

    A causal LM also carries its Hugging Face config (``config``, a dict:
    ``AutoModelForCausalLM.from_config(CONFIG_CLASS.from_dict(config))`` rebuilds it)
    and the data's ``seq_len``.
    """
    out: dict[str, Any] = {"model": cfg.model, "model_size": cfg.model_size,
                           "task": prep.data.task, "input_shape": list(prep.data.input_shape),
                           "num_classes": prep.data.num_classes,
                           "state_dict": trainer.final_state_dict()}
    config = getattr(prep.model, "config", None)
    if prep.data.task == "language-modelling" and config is not None:
        out.update({"config": config.to_dict(), "seq_len": cfg.seq_len})
    return out
