"""``make_private``: the few lines that make an ordinary PyTorch loop DP-SGD.

Example:
    >>> dp = make_private(model, optimizer, train_loader, target_epsilon=3.0,
    ...                   delta=1e-5, epochs=10, max_grad_norm=1.0)  # doctest: +SKIP
    >>> for x, y in dp.data_loader:                                 # doctest: +SKIP
    ...     dp.optimizer.zero_grad()
    ...     F.cross_entropy(dp.model(x), y).backward()
    ...     dp.optimizer.step()
    >>> dp.epsilon()                                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from swiftdp import distributed, pipeline
from swiftdp.accounting import PrivacyAccountant, get_noise_multiplier
from swiftdp.api.training import DPDataLoader, PrivateTraining
from swiftdp.checks import (
    check_clipping,
    check_cost_objective,
    check_delta,
    check_loss_reduction,
    check_mode,
    check_noise_multiplier,
)
from swiftdp.clipping.clip_fns import sensitivity
from swiftdp.clipping.engine import MODES, GradClipper
from swiftdp.clipping.groups import check_clip_thresholds
from swiftdp.clipping.guard import IndependenceCheck
from swiftdp.clipping.views import check_augmult
from swiftdp.data.augment import Augment, Views
from swiftdp.errors import InvalidArgumentError
from swiftdp.optim.adaptive import resolve_adaptive
from swiftdp.optim.noise import make_noise_generator
from swiftdp.optim.optimizer import DPOptimizer, StepState
from swiftdp.optim.schedules import Schedule, check_planned_schedule, schedule_value
from swiftdp.sampling import poisson_data_loader
from swiftdp.settings import AdaptiveClipping, PrivacySettings, SpeedSettings

__all__ = ["DPDataLoader", "PrivateTraining", "make_private"]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader[Any],
    *,
    max_grad_norm: float | Mapping[str, float] | Sequence[float],
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = 1e-5,
    epochs: float | None = None,
    steps: int | None = None,
    clipping: str = "flat",
    mode: str = "bk",
    loss_reduction: str = "mean",
    poisson_sampling: bool = True,
    max_physical_batch_size: int | None = None,
    cost_objective: str = "time",
    accountant: str = "pld",
    secure: bool = False,
    seed: int | None = None,
    batch_first: bool = True,
    check_independence: bool = True,
    check_loss: bool = True,
    token_reduction: str = "mean",
    timeout: float = distributed.DEFAULT_TIMEOUT,
    pipeline_stage: int | None = None,
    noise_schedule: Schedule | None = None,
    clip_schedule: Schedule | None = None,
    adaptive_clipping: AdaptiveClipping | None = None,
    augmult: int = 1,
    augment: Augment | None = None,
) -> PrivateTraining:
    """Make a model, optimizer and loader train with differential privacy.

    Args:
        model: the model, in training mode; not modified (hooks only).
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        train_loader: a ``DataLoader`` with ``batch_size`` = the expected batch size.
        max_grad_norm: the clipping threshold C; or group-wise clipping,
            ``{module-name prefix: C_k}`` (every trainable parameter in exactly
            one group; each example's gradient on group k clipped to C_k on its
            own; noise σ·√Σ_k C_k², see :class:`GradClipper`); or, with
            ``pipeline_stage``, ``[C_0, C_1, ...]``, one per pipeline stage.
        target_epsilon: the budget; σ is calibrated to it over ``epochs`` /
            ``steps`` when ``noise_multiplier`` is not given, and steps that
            would exceed it are refused.
        noise_multiplier: σ, instead of calibrating to a target.
        delta: δ.
        epochs: planned epochs (for calibration).
        steps: planned logical steps (instead of epochs).
        clipping: ``"flat"`` or ``"automatic"``.
        mode: clipping engine mode (a speed choice).
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss combines examples.
        poisson_sampling: Poisson-sample logical batches (the accounting
            assumes it); ``False`` keeps the loader's own batches.
        max_physical_batch_size: split logical batches into chunks of at
            most this many examples; noise is still added once per logical step.
        cost_objective: what the per-layer cost model minimises, ``"time"``
            (default) or ``"memory"``; ``"ghost"`` / ``"instantiate"`` force one
            side for every factored layer (to measure it). Speed and memory
            only: the clipped sum is the same (:mod:`swiftdp.clipping.cost`).
        accountant: ``"pld"`` (default), ``"rdp"`` or ``"prv"``.
        secure: seed the noise generator from OS entropy.
        seed: seed for sampling and noise (ignored for noise when ``secure``).
        batch_first: whether sequence activations are ``(B, T, ...)``.
        check_independence: probe, on the first batch and whenever the input
            shapes change, that no example's output depends on another example
            (three extra forwards without gradient per new input signature;
            see :class:`~swiftdp.clipping.guard.IndependenceCheck`). Turn off
            only for a model known to process examples independently.
        check_loss: on the first step of each output signature, check the loss
            at its backward (``loss.backward()`` or ``dp.backward(losses)``):
            a reduction that does not match ``loss_reduction`` (a sum, ``loss * B``)
            or that couples examples (a token mean over the batch, class
            weights, a normaliser counted over the batch, a contrastive
            loss) is refused before any gradient flows (see
            :mod:`swiftdp.clipping.loss_trace`; one extra backward through the
            loss only). Turn off only for a loss known to decompose.
        token_reduction: for a Hugging Face model called with ``labels=``:
            ``"mean"`` — each example's loss is the mean over its own real
            (non ``-100``) tokens — or ``"sum"``, their sum. The model's own
            loss, a token mean over the whole batch, couples examples and is
            never used (:class:`swiftdp.hf.ModelLoss`).
        timeout: in a process group, the seconds each rank waits for the
            others at ``make_private``, every ``step()`` and every checkpoint
            before raising an error that names the rank that did not arrive
            (crashed, hangs, or skipped the call). See :mod:`swiftdp.distributed`.
        pipeline_stage: this process' stage of a model split into pipeline
            stages, one per rank: it clips its own parameters to its C_k,
            draws the whole Poisson sample and adds all the noise to its own
            parameters (no data parallelism). See :mod:`swiftdp.pipeline`.
        noise_schedule: σ for each step, ``schedule(steps_taken)``, instead of
            ``noise_multiplier`` (e.g. :class:`swiftdp.ExponentialSchedule`);
            the noise and the accountant follow it, and ``target_epsilon``, if
            given, caps the budget (the planned schedule is checked against it
            here, every step again).
        clip_schedule: ``C`` for each step, ``schedule(steps_taken)``, for one
            threshold (``max_grad_norm`` is then the first step's only if the
            schedule says so: the schedule wins); clipping and noise follow.
        adaptive_clipping: thresholds that follow a quantile of the per-example
            norms, with noised counts accounted with the gradient
            (:class:`swiftdp.AdaptiveClipping`; Andrew et al. 2021). With group
            thresholds each ``C_k`` adapts to its own group's norms.
        augmult: augmentation multiplicity (De et al. 2022): ``dp.data_loader``
            yields ``K`` augmented views of each example, inputs ``(B, K, ...)``
            and the other tensors repeated ``(B, K, ...)``; the model runs on
            ``(B·K, ...)`` and returns ``(B, K, ...)``; each example's views are
            clipped together, as one example (sensitivity ``C``, not ``K·C``).
            A mean loss over the ``B·K`` views gives each example the mean of
            its views' gradients. See :mod:`swiftdp.clipping.views`.
        augment: the augmentation applied to each view, a callable on a batch
            of inputs that transforms each example on its own (probed on the
            first batch of each shape): e.g. :func:`swiftdp.data.augment.crop_flip`.
            ``None`` with ``augmult`` repeats the inputs (the model augments).

    Returns:
        A :class:`PrivateTraining` with ``.model``, ``.optimizer``,
        ``.data_loader`` and ``.epsilon()``.

    Raises:
        InvalidArgumentError: an argument is out of range or missing (the
            message names it and the fix).
        UnsupportedModuleError: the model has a module that cannot be
            clipped exactly (BatchNorm: use ``swiftdp.fix(model)``).
    """
    thresholds = check_clip_thresholds(max_grad_norm, pipeline_stage)
    check_augmult(augmult)
    if augmult > 1 and pipeline_stage is not None:
        raise InvalidArgumentError(
            f"augmult={augmult} with pipeline_stage={pipeline_stage}: augmentation "
            "multiplicity is not supported across pipeline stages yet. Use it in one process "
            "or with data parallelism.")
    check_delta(delta)
    check_clipping(clipping)
    check_mode(mode, MODES)
    check_cost_objective(cost_objective)
    check_loss_reduction(loss_reduction)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"Expected `model` to be an nn.Module, got {type(model).__name__}.")
    if not model.training:
        raise InvalidArgumentError(
            "`model` is in eval mode (model.training is False). Call model.train() before "
            "make_private: DP training runs the model in training mode."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(
            f"Expected `optimizer` to be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if max_physical_batch_size is not None and (
        not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1
    ):
        raise InvalidArgumentError(
            f"Expected max_physical_batch_size >= 1 or None, got {max_physical_batch_size!r}."
        )
    if noise_schedule is not None:
        if noise_multiplier is not None:
            raise InvalidArgumentError(
                f"Got both noise_multiplier={noise_multiplier!r} and noise_schedule=: the "
                "schedule gives σ for every step, the first included. Pass one of them.")
        noise_multiplier = schedule_value(noise_schedule, 0, "noise_schedule", allow_zero=True)
    if clip_schedule is not None:
        if adaptive_clipping is not None or isinstance(thresholds, tuple):
            raise InvalidArgumentError(
                "clip_schedule= sets one threshold C per step; it cannot be combined with "
                "adaptive_clipping= or group (or pipeline) thresholds. For groups call "
                "dp.set_max_grad_norm({prefix: C_k}) between steps.")
        thresholds = schedule_value(clip_schedule, 0, "clip_schedule", allow_zero=False)
    if noise_multiplier is None and target_epsilon is None:
        raise InvalidArgumentError(
            "Pass either target_epsilon= (σ is calibrated to it) or noise_multiplier=."
        )
    if noise_multiplier is not None:
        check_noise_multiplier(noise_multiplier)
    if target_epsilon is not None and (
        not isinstance(target_epsilon, (int, float)) or not target_epsilon > 0
    ):
        raise InvalidArgumentError(
            f"Expected target_epsilon > 0, got {target_epsilon!r}. Typical budgets are 1 to 10."
        )

    # secure=True: the sampling is seeded from OS entropy too (batch membership
    # is as secret as the noise); seed= then only seeds nothing private.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise InvalidArgumentError(
            "make_private got a DistributedDataParallel model: DDP all-reduces the plain "
            "gradients during the backward, which swiftdp never lets reach the parameters "
            "(its per-example clipped sums are all-reduced by the DP optimizer's step). Pass "
            "the plain module (`ddp.module`), in a process group: make_private then trains "
            "data-parallel itself (swiftdp.distributed).")
    ranks = distributed.make_ranks(timeout)
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    sample_seed = None if secure else seed
    # One pipeline stage per rank (swiftdp.pipeline): the whole sample, no all-reduce.
    stages, sample_seed = pipeline.join_stages(ranks, pipeline_stage, thresholds, sample_seed,
                                               mode=mode, poisson_sampling=poisson_sampling)
    ranks = None if stages is not None else ranks
    control = None if (stages or ranks) is None else (stages or ranks).control  # type: ignore[union-attr]
    if ranks is not None:
        # Data-parallel (swiftdp.distributed): one sample, split by rank.
        ranks.rendezvous("make_private")
        if not poisson_sampling:
            raise InvalidArgumentError(
                "poisson_sampling=False is not supported in a process group: the ranks "
                "split one Poisson sample of the whole dataset. Use poisson_sampling=True.")
        distributed.broadcast_model(model)
        sample_seed = distributed.shared_seed(sample_seed, ranks.control)
    loader, sample_rate, expected = _sampling(train_loader, poisson_sampling, sample_seed,
                                              rank if ranks else 0, world if ranks else 1)
    num_samples = len(loader.dataset)  # type: ignore[arg-type]
    if world > 1:
        distributed.check_same(
            [num_samples, sample_rate, expected, sensitivity(thresholds),
             -1.0 if noise_multiplier is None else float(noise_multiplier),
             -1.0 if target_epsilon is None else float(target_epsilon), float(delta)],
            "the dataset size, sample rate, expected batch size, C, σ, target ε or δ",
            group=control)
    if delta >= 1.0 / num_samples:
        warnings.warn(
            f"delta={delta} is not below 1/N = 1/{num_samples}: a mechanism that publishes "
            "one random example outright satisfies this δ. Use delta < 1/N (e.g. 1/(10·N)).",
            UserWarning, stacklevel=2,
        )
    steps_per_epoch = len(loader)
    total_steps = _planned_steps(epochs, steps, steps_per_epoch)
    if noise_multiplier is None:
        assert target_epsilon is not None
        if total_steps is None:
            raise InvalidArgumentError(
                "target_epsilon needs the length of training to calibrate σ: pass epochs= "
                "or steps=."
            )
        noise_multiplier = get_noise_multiplier(
            target_epsilon=float(target_epsilon), delta=delta, sample_rate=sample_rate,
            steps=total_steps, mechanism=accountant,
        )
    largest_sigma = float(noise_multiplier)  # adaptive clipping must hold for every step's σ
    if adaptive_clipping is not None and noise_schedule is not None and total_steps:
        largest_sigma = max(schedule_value(noise_schedule, t, "noise_schedule", allow_zero=True)
                            for t in range(total_steps))
    adaptive = resolve_adaptive(adaptive_clipping, noise_multiplier=largest_sigma,
                                expected_batch_size=float(expected),
                                groups=len(thresholds) if isinstance(thresholds, tuple) else 1,
                                clipping=clipping, pipeline=pipeline_stage is not None)
    privacy = PrivacySettings(
        adaptive=adaptive,
        noise_multiplier=float(noise_multiplier), max_grad_norm=thresholds,
        delta=float(delta), sample_rate=float(sample_rate), expected_batch_size=float(expected),
        clipping=clipping,  # type: ignore[arg-type]
        poisson_sampling=poisson_sampling, accountant=accountant,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        pipeline_stage=pipeline_stage,
    )
    if world > 1:  # what fixes the mechanism must be the same on every rank
        from swiftdp.api.fingerprint import dataset_fingerprint

        distributed.check_same_objects({
            "the noise multiplier σ": privacy.noise_multiplier,
            "the planned steps": total_steps, "secure": bool(secure), "seeded": seed is not None,
            "the accountant": accountant, "the mode": mode if stages is None else None,
            "loss_reduction": loss_reduction, "the clipping thresholds": thresholds,
            "the clipping": clipping, "max_physical_batch_size": max_physical_batch_size,
            "the model's parameters and buffers (name, shape, dtype, trainable)": [
                (n, tuple(t.shape), str(t.dtype), t.requires_grad)
                for n, t in [*model.named_parameters(), *model.named_buffers()]
            ] if stages is None else None,
            "the dataset (fingerprint)": dataset_fingerprint(loader.dataset),
            f"debug mode ({distributed.DEBUG_ENV})": (stages or ranks).debug,  # type: ignore[union-attr]
            "adaptive clipping": adaptive,
            "schedules (noise, clip)": (noise_schedule is not None, clip_schedule is not None),
            "augmult": augmult,
        }, group=control)
    speed = SpeedSettings(mode=mode, max_physical_batch_size=max_physical_batch_size,
                          cost_objective=cost_objective)
    params = _trainable_params(model, optimizer)
    acct = PrivacyAccountant(accountant)
    # Each rank its own noise stream (its share of the noise, independent).
    gen, _ = make_noise_generator(None if seed is None else seed + 1 + 7919 * rank,
                                  secure=secure)
    state = StepState()
    receiver: list[DPOptimizer] = []
    clipper = GradClipper(
        model, privacy.clip_thresholds(), clipping=privacy.clipping,
        mode=mode,  # type: ignore[arg-type]
        loss_reduction=loss_reduction,  # type: ignore[arg-type]
        batch_first=batch_first,
        cost_objective=cost_objective,  # type: ignore[arg-type]
        sink=lambda result: receiver[0].receive(result),
        check_loss=check_loss and pipeline.has_loss(privacy),
        token_reduction=token_reduction,  # type: ignore[arg-type]
        augmult=augmult,
    )
    if stages is None:
        dp_opt = DPOptimizer(optimizer, params, privacy, acct, gen, state,
                             trainable=clipper.trainable_parameters, ranks=ranks)
    else:
        dp_opt = pipeline.StageOptimizer(optimizer, params, privacy, acct, gen, state,
                                         trainable=clipper.trainable_parameters, stages=stages)
    receiver.append(dp_opt)
    dp_opt.configure(clipper.set_max_grad_norm, noise_schedule, clip_schedule)
    if check_independence:
        clipper.add_probe(IndependenceCheck(model, clipper, batch_dim=0 if batch_first else 1))
    if privacy.target_epsilon is not None and total_steps is not None:
        if noise_schedule is None:
            dp_opt.verify_budget_for(total_steps)
        else:
            check_planned_schedule(noise_schedule, total_steps, privacy)
    dp_loader = DPDataLoader(loader, state, max_physical_batch_size,
                             Views(augmult, augment) if augmult > 1 or augment else None)
    training = PrivateTraining(model, dp_opt, dp_loader, clipper, acct, speed, num_samples)
    if stages is not None:
        assert isinstance(dp_opt, pipeline.StageOptimizer) and pipeline_stage is not None
        sampler = getattr(loader, "poisson_sampler", None)
        dp_opt.connect(
            pipeline.StageLink(model, stages, pipeline_stage,
                               pipeline.stage_order(stages, pipeline_stage)),
            lambda: pipeline.sample_state(sampler, dp_loader.steps_in_epoch))
    return training


def _sampling(train_loader: DataLoader[Any], poisson: bool, seed: int | None,
              rank: int = 0, world: int = 1) -> tuple[DataLoader[Any], float, float]:
    if poisson:
        pl = poisson_data_loader(train_loader, seed=seed, name="train_loader", rank=rank,
                                 world_size=world)
        return pl, float(pl.sample_rate), float(pl.expected_batch_size)
    if not isinstance(train_loader, DataLoader):
        raise InvalidArgumentError(
            f"Expected `train_loader` to be a DataLoader, got {type(train_loader).__name__}."
        )
    try:
        n = len(train_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            "`train_loader.dataset` has no __len__, so the sample rate cannot be computed. "
            "Use a map-style dataset."
        ) from None
    bs = train_loader.batch_size
    if bs is None:
        raise InvalidArgumentError(
            "`train_loader.batch_size` is None; build the loader with batch_size=<batch size>."
        )
    warnings.warn(
        "poisson_sampling=False: batches are fixed-size shuffles, which the accountant "
        "(built for Poisson sampling) does not describe exactly. Use it for debugging only.",
        UserWarning, stacklevel=3,
    )
    return train_loader, bs / n, float(bs)


def _planned_steps(epochs: float | None, steps: int | None, steps_per_epoch: int) -> int | None:
    if epochs is not None and steps is not None:
        raise InvalidArgumentError(
            f"Got both epochs={epochs!r} and steps={steps!r}; pass only one."
        )
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"Expected steps >= 1, got {steps!r}.")
        return steps
    if epochs is not None:
        if not isinstance(epochs, (int, float)) or not epochs > 0 or math.isinf(epochs):
            raise InvalidArgumentError(f"Expected epochs > 0, got {epochs!r}.")
        from fractions import Fraction

        return math.ceil(Fraction(str(epochs)) * steps_per_epoch)
    return None


def _trainable_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    in_model = {id(p) for p in model.parameters()}
    foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
               if id(p) not in in_model and p.requires_grad]
    if foreign:
        raise InvalidArgumentError(
            f"`optimizer` holds trainable parameters of shapes {foreign[:5]} that are not "
            "parameters of `model`: swiftdp cannot clip them, so they would train on "
            "un-noised gradients. Register them in the model (e.g. a learned temperature as "
            "a module attribute, used in its forward), or freeze them."
        )
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgumentError(
            "`model` has no trainable parameter (all requires_grad=False); nothing to train."
        )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_opt]
    if missing:
        warnings.warn(
            f"Trainable parameters {missing[:5]} are not in `optimizer`; they are clipped "
            "(they count toward each example's norm) but never updated.",
            UserWarning, stacklevel=3,
        )
    return params
