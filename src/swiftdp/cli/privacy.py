"""The DP-SGD of ``swiftdp train`` from its options: σ, C, their schedules, the average.

:func:`make_run_private` calls :func:`swiftdp.make_private` with what the
options say, then refuses (before any step) a run that would fail or
overspend later: a given σ whose planned steps exceed ``--epsilon``, a clip
schedule that leaves the positive numbers, a noise schedule that outgrows
adaptive clipping's count noise. :func:`parameter_average` builds the
:class:`swiftdp.ParameterAverage` that is evaluated and saved. Errors name
the flags, the values and the fix.

============================  =================================================
options                       σ of the run
============================  =================================================
(none)                        calibrated to ``--epsilon`` over ``--epochs``
``--noise-multiplier S``      ``S`` at every step; ``--epsilon`` caps it
``--noise-multiplier S``      ``S`` at the first step, then the schedule;
``--noise-schedule SPEC``     ``--epsilon`` caps the planned schedule
============================  =================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from swiftdp.api.private import PrivateTraining, make_private
from swiftdp.averaging import ParameterAverage
from swiftdp.cli.options import TrainConfig
from swiftdp.cli.specs import build_adaptive, build_schedule
from swiftdp.clipping.clip_fns import Thresholds, sensitivity
from swiftdp.clipping.groups import per_layer_thresholds
from swiftdp.data.augment import Augment, crop_flip, random_crop
from swiftdp.errors import InvalidArgumentError
from swiftdp.optim.schedules import Schedule
from swiftdp.settings import AdaptiveClipping

__all__ = ["Plan", "make_run_private", "parameter_average", "plan_of"]


@dataclass(frozen=True)
class Plan:
    """The library objects of a run's schedules and adaptive clipping (``None``: not used).

    Attributes:
        noise_schedule: σ per step, from ``--noise-multiplier`` and ``--noise-schedule``.
        clip_schedule: C per step, from ``--max-grad-norm`` and ``--clip-schedule``.
        adaptive: ``--adaptive-clipping`` (its count noise unresolved).
    """

    noise_schedule: Schedule | None
    clip_schedule: Schedule | None
    adaptive: AdaptiveClipping | None


def plan_of(cfg: TrainConfig) -> Plan:
    """Build the schedules and adaptive clipping of ``cfg`` (checked by :mod:`swiftdp.cli.options`)."""
    noise = None
    if cfg.noise_schedule is not None:
        assert cfg.noise_multiplier is not None  # check_combination
        noise = build_schedule(cfg.noise_schedule, cfg.noise_multiplier)
    clip = None if cfg.clip_schedule is None else build_schedule(cfg.clip_schedule,
                                                                  cfg.max_grad_norm)
    adaptive = None if cfg.adaptive_clipping is None else build_adaptive(cfg.adaptive_clipping)
    return Plan(noise, clip, adaptive)


def make_run_private(cfg: TrainConfig, plan: Plan, model: nn.Module, optimizer: Any,
                     dataset: Any, batch_size: int) -> PrivateTraining:
    """``make_private`` with the run's options, and the checks that need the planned steps.

    Args:
        cfg: the options.
        plan: :func:`plan_of` ``cfg``.
        model: the trained module.
        optimizer: its ``torch.optim`` optimizer.
        dataset: the training examples.
        batch_size: the expected (Poisson) batch size.

    Returns:
        The private run (:func:`swiftdp.make_private`'s).

    Raises:
        InvalidArgumentError: the planned steps would overspend ``--epsilon``,
            or a schedule would fail at a later step (see the module docstring).
    """
    try:
        dp = make_private(
            model, optimizer, DataLoader(dataset, batch_size=batch_size),
            max_grad_norm=(per_layer_thresholds(model, cfg.max_grad_norm) if cfg.clip_per_layer
                           else cfg.max_grad_norm),
            target_epsilon=cfg.epsilon, delta=cfg.delta,
            noise_multiplier=cfg.noise_multiplier if plan.noise_schedule is None else None,
            noise_schedule=plan.noise_schedule, clip_schedule=plan.clip_schedule,
            adaptive_clipping=plan.adaptive,
            epochs=cfg.epochs, clipping=cfg.clipping, mode=cfg.mode, loss_reduction="sum",
            max_physical_batch_size=cfg.max_physical_batch_size, accountant=cfg.accountant,
            seed=cfg.seed, secure=cfg.secure, augmult=cfg.augmult, augment=augment_for(cfg),
        )
    except InvalidArgumentError as e:
        raise _in_flag_terms(cfg, e) from None
    except OverflowError:
        if cfg.accountant != "gdp":
            raise
        # swiftdp.accounting.gdp's closed form overflows for a very small σ (ε far
        # beyond any budget) instead of returning a large ε.
        sigma = ("calibrated" if cfg.noise_multiplier is None
                 else f"--noise-multiplier {cfg.noise_multiplier:g}")
        schedule = "" if cfg.noise_schedule is None else f" --noise-schedule {cfg.noise_schedule}"
        raise InvalidArgumentError(
            f"--accountant gdp overflowed computing ε for σ ({sigma}{schedule}) over "
            f"{_epochs(cfg)}: a σ this small spends far more than --epsilon "
            f"{cfg.epsilon:g}. Raise --noise-multiplier (or the schedule's GAMMA or MIN), or "
            "use --accountant rdp or pld, which report the ε.") from None
    _check_planned_steps(cfg, plan, dp, len(dp.data_loader) * cfg.epochs)
    return dp


def _in_flag_terms(cfg: TrainConfig, e: InvalidArgumentError) -> InvalidArgumentError:
    """The library's error about a schedule or adaptive clipping, with the flags that set it.

    The library names its arguments (``noise_schedule``, ``AdaptiveClipping.count_noise``);
    they are recognised by the start of its message.
    """
    text = str(e)
    if cfg.noise_schedule is not None and text.startswith("noise_schedule"):
        return InvalidArgumentError(
            f"--noise-schedule {cfg.noise_schedule} from --noise-multiplier "
            f"{cfg.noise_multiplier:g} (--epsilon {cfg.epsilon:g}): {text} With the options: "
            "a larger --noise-multiplier, a GAMMA nearer 1 or a larger MIN, fewer --epochs, "
            "or a larger --epsilon.")
    if cfg.adaptive_clipping is not None and text.lower().startswith(
            ("adaptiveclipping", "adaptive clipping")):
        return InvalidArgumentError(
            f"--adaptive-clipping {cfg.adaptive_clipping}: {text} (COUNT_NOISE is the third "
            "field of --adaptive-clipping QUANTILE:LR:COUNT_NOISE.)")
    return e


def _check_planned_steps(cfg: TrainConfig, plan: Plan, dp: PrivateTraining, planned: int) -> None:
    """Refuse now what would fail or overspend at a later step of the ``planned`` ones."""
    if cfg.noise_multiplier is not None and plan.noise_schedule is None:
        # make_private refuses only the step that would overspend; refuse the run now.
        eps = dp.optimizer.verify_budget_for(planned)
        if eps > cfg.epsilon:
            raise InvalidArgumentError(
                f"--noise-multiplier {cfg.noise_multiplier:g} would spend ε = {eps:.4f} over "
                f"the {planned} planned steps ({_epochs(cfg)}), more than --epsilon "
                f"{cfg.epsilon:g}: raise --noise-multiplier, train fewer --epochs, raise "
                "--epsilon, or drop --noise-multiplier to calibrate σ to --epsilon.")
    if plan.clip_schedule is not None:
        for t in range(planned):
            c = plan.clip_schedule(t)
            if not (math.isfinite(c) and c > 0):
                raise InvalidArgumentError(
                    f"--clip-schedule {cfg.clip_schedule} from --max-grad-norm "
                    f"{cfg.max_grad_norm:g} gives C = {c!r} at step {t} of the {planned} "
                    "planned: C must stay a positive number. Give a floor (exp:GAMMA:MIN "
                    "with MIN > 0), a GAMMA nearer 1, or fewer --epochs.")
    adaptive = dp.privacy.adaptive
    if plan.noise_schedule is not None and adaptive is not None:
        assert adaptive.count_noise is not None
        limit = 2 * adaptive.count_noise  # count_noise > σ·√K/2, K = 1 threshold
        for t in range(planned):
            sigma = plan.noise_schedule(t)
            if sigma >= limit:
                raise InvalidArgumentError(
                    f"--noise-schedule {cfg.noise_schedule} from --noise-multiplier "
                    f"{cfg.noise_multiplier:g} reaches σ = {sigma:.4g} at step {t}, but "
                    f"--adaptive-clipping {cfg.adaptive_clipping} (count noise "
                    f"{adaptive.count_noise:.4g}) fits in the same Gaussian mechanism only "
                    f"while σ < 2·COUNT_NOISE = {limit:.4g}. Give a larger COUNT_NOISE "
                    "(--adaptive-clipping QUANTILE:LR:COUNT_NOISE), or a schedule that keeps "
                    "σ below it.")


def parameter_average(cfg: TrainConfig, model: nn.Module, planned: int) -> ParameterAverage | None:
    """The average of ``model``'s weights that is evaluated and saved (``None``: the weights).

    Build it after :func:`make_run_private`: in a process group that copies
    rank 0's initial weights, where the average starts.

    Raises:
        InvalidArgumentError: ``--polyak START`` with ``START`` not below the
            ``planned`` steps (the mean would be the last weights alone).
    """
    if cfg.polyak is not None:
        if cfg.polyak >= planned:
            raise InvalidArgumentError(
                f"--polyak {cfg.polyak} averages the weights after step {cfg.polyak}, but the "
                f"run has {planned} steps ({_epochs(cfg)}): use a START below {planned} "
                f"(e.g. {planned // 2}), or more --epochs.")
        return ParameterAverage(model, kind="polyak", start_step=cfg.polyak)
    if cfg.ema > 0:
        return ParameterAverage(model, cfg.ema, warmup=cfg.ema_warmup)
    return None


def _epochs(cfg: TrainConfig) -> str:
    return f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}"


def averaging_text(average: ParameterAverage | None) -> str:
    """How the evaluated weights are made, for the report (``EMA, decay 0.9``)."""
    if average is None:
        return "none (the last weights)"
    if average.kind == "polyak":
        return f"Polyak mean of the weights after step {average.start_step}"
    warmup = ", warmup" if average.warmup else ""
    return f"EMA, decay {average.decay:g}{warmup}"


_CROP = {"cifar10": 4, "mnist": 2, "mnist5k": 2, "digits": 1}  # pixels: about 1/8 of a side


def augment_for(cfg: TrainConfig) -> Augment | None:
    """The per-example augmentation of ``--augment`` (``auto``: by dataset, with ``--augmult``)."""
    kind = cfg.augment
    if kind == "auto":
        kind = "none" if cfg.augmult == 1 else (
            "crop-flip" if cfg.dataset == "cifar10" else "crop")
    if kind == "none":
        return None
    pad = _CROP.get(cfg.dataset, 2)
    # Digits lie on a black background: shifted in, not mirrored at the border.
    border = "reflect" if cfg.dataset == "cifar10" else "constant"
    return crop_flip(pad, border) if kind == "crop-flip" else random_crop(pad, border)


def total_clip(thresholds: Thresholds) -> float:
    """One number for a run's thresholds: ``C``, or ``√Σ_k C_k²`` per layer (the sensitivity)."""
    return float(sensitivity(thresholds, "flat"))
