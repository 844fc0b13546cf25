"""The stages of a pipeline: joining them in ``make_private``, and their optimizer."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from swiftdp import distributed
from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.clipping.step import BackwardResult
from swiftdp.errors import InvalidArgumentError, StepStructureError, SwiftDPError
from swiftdp.optim.optimizer import DPOptimizer
from swiftdp.pipeline.link import StageLink
from swiftdp.settings import PrivacySettings

__all__ = ["StageOptimizer", "has_loss", "join_stages", "sample_state", "stage_order"]

_RECEIVING_MODES = ("bk", "per_sample")


def join_stages(ranks: distributed.Ranks | None, stage: int | None, thresholds: Thresholds,
                sample_seed: int | None, *, mode: str, poisson_sampling: bool
                ) -> tuple[distributed.Ranks | None, int | None]:
    """Check this process' place in the pipeline, if any; the pipeline and its sampling seed.

    Collective in a process group: every rank calls it (from ``make_private``),
    and all of them raise together when one is misconfigured; ranks of which
    some pass ``pipeline_stage`` and some do not are refused (they would
    otherwise wait in different collectives).

    Args:
        ranks: the process group (``None`` without one).
        stage: this process' ``pipeline_stage`` (``None``: not a pipeline).
        thresholds: the checked ``max_grad_norm``: with a stage, every
            stage's threshold, ``(("stage 0", C_0), ...)``.
        sample_seed: this process' sampling seed (``None``: rank 0 draws one).
        mode: this stage's engine mode.
        poisson_sampling: must be ``True`` for a pipeline.

    Returns:
        ``(None, sample_seed)`` outside a pipeline; else the pipeline's
        process group and rank 0's sampling seed.

    Raises:
        InvalidArgumentError: a stage without a process group; ranks that
            disagree on being stages; not as many stages as ranks; a stage
            index taken twice; a mode that cannot send the activation
            gradient back; or ``poisson_sampling=False``.
    """
    if ranks is None:
        if stage is not None:
            raise InvalidArgumentError(
                f"pipeline_stage={stage} needs a process group with one process per stage "
                "(torchrun, then torch.distributed.init_process_group). Without one, clip "
                "groups of one model with max_grad_norm={module-name prefix: C_k}.")
        return None, sample_seed
    ranks.rendezvous("make_private")
    everyone = distributed.gather_objects((stage, mode), ranks.control)
    stages = [s for s, _ in everyone]
    if all(s is None for s in stages):
        return None, sample_seed  # data parallel (swiftdp.distributed)
    if any(s is None for s in stages):
        raise InvalidArgumentError(
            f"Some ranks passed pipeline_stage= and some did not (pipeline_stage={stages}, by "
            "rank): a process group runs either one pipeline stage per rank or data "
            "parallelism. Pass pipeline_stage=rank on every rank, or on none.")
    n = len(thresholds) if isinstance(thresholds, tuple) else 1
    if n != ranks.world or sorted(s for s in stages if s is not None) != list(range(n)):
        raise InvalidArgumentError(
            f"The pipeline has {ranks.world} ranks and max_grad_norm lists {n} stages; the "
            f"ranks passed pipeline_stage={stages} (by rank). Run one process per stage, "
            "stage k once, and pass every stage's threshold in max_grad_norm.")
    bad = [(s, m) for s, m in everyone if s and m not in _RECEIVING_MODES]
    if bad:
        raise InvalidArgumentError(
            f"Pipeline stage {bad[0][0]} uses mode={bad[0][1]!r}, but it receives activations "
            "and must send their gradient back: ghost's two backward passes would send twice "
            "the gradient, nanobatch none. Use mode='bk' (or 'per_sample') on every stage "
            "after the first.")
    if not poisson_sampling:
        raise InvalidArgumentError(
            "poisson_sampling=False is not supported for pipeline stages: every stage must "
            "draw the same Poisson sample. Use poisson_sampling=True.")
    return ranks, distributed.shared_seed(sample_seed, ranks.control)


def has_loss(privacy: PrivacySettings) -> bool:
    """Whether this process computes the loss: not a pipeline stage, or the last one.

    A stage before the last backpropagates the next stage's gradient
    (``dp.stage_backward()``): it has no loss, so the engine's loss check is
    off there (:class:`StageLink` guards its output and backward instead).

    Args:
        privacy: the run's settings.

    Returns:
        ``False`` for a pipeline stage before the last, else ``True``.
    """
    stage, limits = privacy.pipeline_stage, privacy.max_grad_norm
    return stage is None or not isinstance(limits, tuple) or stage == len(limits) - 1


def stage_order(stages: distributed.Ranks, stage: int) -> list[int]:
    """The rank of each stage (collective over the pipeline): ``order[k]`` holds stage ``k``."""
    by_rank = distributed.gather_objects(stage, stages.control)
    return [by_rank.index(k) for k in range(len(by_rank))]


def sample_state(sampler: Any, consumed: int) -> torch.Tensor | None:
    """The sampler's generator state after the ``consumed``-th batch of its epoch (never raises).

    A sampler whose history no longer reaches that batch (its state was
    loaded since) gives its current state with a marker, which no stage
    drawing normally can match.
    """
    if sampler is None:
        return None
    try:
        state: torch.Tensor = sampler.state_dict(steps_consumed=consumed)["generator_state"]
        return state
    except SwiftDPError:
        return torch.cat([torch.tensor([255, 0, 255], dtype=torch.uint8),
                          sampler.generator.get_state()])


def digest(t: torch.Tensor | None) -> str:
    """SHA-256 of a (generator state) tensor's bytes: compared across stages, never revealed."""
    if t is None:
        return ""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


class StageOptimizer(DPOptimizer):
    """The :class:`DPOptimizer` of one pipeline stage: its own noise, checked against the others.

    It adds ``N(0, σ²S²)`` to its own parameters' clipped sums (``S`` of all
    stages, from the settings), all-reduces nothing, accepts clipped sums only
    from the backward its :class:`StageLink` allows (on a stage before the
    last, ``dp.stage_backward()``), sends the received activations' gradient
    back once a backward is accepted, and before each logical step checks
    that every stage is at the same logical step with the same σ and drew the
    same sample (a digest of the sampler's state after this batch), and that
    no two stages hold the same noise generator state (two stages adding the
    same noise would cancel it in their difference).

    Args:
        *args: as :class:`DPOptimizer`.
        stages: the process group of the pipeline.
        **kwargs: as :class:`DPOptimizer` (without ``ranks``).
    """

    stages: distributed.Ranks
    link: StageLink | None
    sample_state: Callable[[], torch.Tensor | None]

    def __init__(self, *args: Any, stages: distributed.Ranks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "link", None)
        object.__setattr__(self, "sample_state", lambda: None)

    def connect(self, link: StageLink, sample_state: Callable[[], torch.Tensor | None]) -> None:
        """Attach the stage's link and the sampler's state after the current batch."""
        object.__setattr__(self, "link", link)
        object.__setattr__(self, "sample_state", sample_state)

    def _stage_of_a_pipeline(self) -> bool:
        return True

    def receive(self, result: BackwardResult) -> None:
        """:meth:`DPOptimizer.receive`, for the link's backward only; then send the gradient back.

        Raises:
            ExampleMixingError: on a stage before the last, a backward that did
                not start from ``dp.stage_backward()``.
            StepStructureError: as :meth:`DPOptimizer.receive`.
        """
        link = self.link
        if link is not None:
            link.check_delivery()
        super().receive(result)
        if link is not None:
            link.send_gradient()

    def step(self, closure: Any = None) -> Any:
        """Check every stage is at this logical step with this σ and sample, then step.

        Raises:
            StepStructureError: the stages disagree (a skipped batch,
                ``set_noise_multiplier`` on one stage only, a sampler whose
                state was changed on one stage), two stages share a noise
                stream, activations or gradients are still in flight, or a
                stage did not come.
        """
        if self.link is not None:
            self.link.check_step()
        stamp = self.step_state.current
        if (stamp is not None and stamp.chunk == stamp.chunks - 1
                and stamp.logical > self.step_state.stepped):
            streams = (digest(self.sample_state()), digest(self.generator.get_state()))
            with distributed.step_collective():
                self.stages.rendezvous(f"optimizer.step() of logical step {stamp.logical}")
                distributed.check_same(
                    [float(stamp.logical), float(self.steps_taken), self.noise_multiplier],
                    "the logical step (index, steps taken) or the noise multiplier σ",
                    StepStructureError,
                    "Every stage must call optimizer.step() once per batch of dp.data_loader, "
                    "empty batches included, with the same noise multiplier (a noise schedule "
                    "on every stage alike).", group=self.stages.control)
                self._check_streams(streams)
        return super().step(closure)

    def _check_streams(self, mine: tuple[str, str]) -> None:
        everyone = distributed.gather_objects(mine, self.stages.control)
        if len({sample for sample, _ in everyone}) > 1:
            raise StepStructureError(
                "The pipeline stages drew different samples for this step (their samplers' "
                "states differ: a sampler state loaded or changed on one stage only). Every "
                "stage must train on the same Poisson sample; restore stages together "
                "(checkpoints of pipeline stages are refused for now).")
        noise = [n for _, n in everyone]
        if len(set(noise)) < len(noise):
            raise StepStructureError(
                "Two pipeline stages hold the same noise generator state (an optimizer state "
                "loaded from another stage): their noise would be identical, not independent, "
                "and the guarantee would not hold. Give each stage its own optimizer state.")
