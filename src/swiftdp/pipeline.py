"""Per-device clipping for a model split into pipeline stages, one stage per process.

Each process of a ``torch.distributed`` group holds one stage of the model
(stage 0 reads the inputs, the last one computes the loss) and passes the
activations forward and their gradients back itself (``dist.send`` /
``dist.recv``). With ``make_private(stage_model, ..., pipeline_stage=k,
max_grad_norm=[C_0, C_1, ...])`` — the same list on every stage — stage ``k``
clips each example's gradient of *its own* parameters to ``C_k``, with that
example's norm over its own parameters only: no per-example norm crosses
processes (He et al. 2022, per-device clipping). Example:

    >>> dp = swiftdp.make_private(stage, opt, loader, max_grad_norm=[1.0, 1.0],
    ...                           pipeline_stage=rank, noise_multiplier=1.0,
    ...                           steps=100)                       # doctest: +SKIP
    >>> for x, y in dp.data_loader:   # the same batches on every stage  # doctest: +SKIP
    ...     dp.optimizer.zero_grad()
    ...     if rank == 0:
    ...         h = dp.model(x)
    ...         dist.send(h.detach(), 1)
    ...         g = torch.empty_like(h)
    ...         dist.recv(g, 1)
    ...         dp.stage_backward(h, g)  # the next stage's gradient, not a loss
    ...     else:
    ...         h = torch.empty(len(y), d)
    ...         dist.recv(h, 0)
    ...         h.requires_grad_()
    ...         F.cross_entropy(dp.model(h), y).backward()
    ...         dist.send(h.grad, 0)   # unclipped: stage 0 clips its own part
    ...     dp.optimizer.step()

The mechanism, and why it is private:

* **One sample.** Every stage draws the same Poisson sample (one sampling
  seed, shared from rank 0; secret with ``secure=True``), not split by rank
  as in data parallelism: example ``i`` of a batch is row ``i`` on every
  stage. Send the rows in the loader's order, unmixed.
* **Per-example rows across the boundary.** The gradient a stage receives
  is ``∂L/∂h`` of the next stage's loss. The next stage's engine refuses
  modules that mix examples (BatchNorm, batch statistics, cross-row
  operations: its tracer and independence probe) and its loss check refuses
  losses that couple examples, so row ``i`` of ``∂L/∂h`` depends on example
  ``i`` and the public parameters only, and so does every per-example
  gradient the receiving stage forms from it. Stage ``k``'s clipped sum
  therefore changes by at most ``C_k`` when one example is added or removed,
  and the whole model's by at most ``S = √Σ_k C_k²``.
* **The backward of a stage without a loss** is ``dp.stage_backward(h, g)``:
  such a stage has no loss to check (``check_loss`` is off there), so a hook
  on its output refuses any gradient but the received ``g`` (a regulariser
  of ``h`` or a second backward could couple examples unchecked;
  :class:`StageOutput`), and its
  engine scales the captured gradients by the same ``loss_reduction`` as the
  last stage (``"mean"``: ``g`` carries the loss's ``1/B``, ``B`` the same on
  every stage since the batch is), which every stage must declare alike.
* **Noise.** Each stage adds ``N(0, σ²S²)`` to every coordinate of its own
  clipped sum, from its own generator (seeded ``seed + 1 + 7919·rank``, or
  OS entropy), and divides by ``q·N``; nothing is all-reduced. The stages
  together release the whole model's clipped sum plus ``N(0, σ²S² I)``: one
  Gaussian mechanism with noise multiplier ``σ``, so every stage's
  accountant records the same ``(σ, q)`` steps and reports the same ε, that
  of the whole model.
* **Checked.** ``make_private`` refuses stages that disagree on the dataset
  (size, fingerprint), ``q``, ``q·N``, the list ``[C_0, ...]``, σ, the target
  ε, δ, the planned steps, ``secure``, seeding, the accountant, the clipping
  style, ``loss_reduction`` or physical batching; stage indices that are not
  ``0 .. W-1`` once each (``W`` = ranks = stages); and ``mode="ghost"`` or
  ``"nanobatch"`` on a stage that receives activations (ghost's two backward
  passes would send back twice the gradient, nanobatch none). Every
  ``step()`` refuses stages at different logical steps or with different σ
  (``set_noise_multiplier`` on one stage only).

Checkpoints of pipeline stages are refused for now (they must be written and
restored by all stages together: per-stage files could let two stages resume
one noise stream, or a secure resume draw different samples per stage).

References:
    He et al. Exploring the limits of differentially private deep learning
    with group-wise clipping. ICLR 2023.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from swiftdp import distributed
from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.errors import ExampleMixingError, InvalidArgumentError, StepStructureError
from swiftdp.optim.optimizer import DPOptimizer
from swiftdp.settings import PrivacySettings

__all__ = ["StageOptimizer", "StageOutput", "has_loss", "join_stages"]

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
    (``dp.stage_backward(h, g)``): it has no loss, so the engine's loss check is
    off there (:class:`StageOutput` guards its output instead).

    Args:
        privacy: the run's settings.

    Returns:
        ``False`` for a pipeline stage before the last, else ``True``.
    """
    stage, limits = privacy.pipeline_stage, privacy.max_grad_norm
    return stage is None or not isinstance(limits, tuple) or stage == len(limits) - 1


class StageOptimizer(DPOptimizer):
    """The :class:`DPOptimizer` of one pipeline stage: its own noise, checked against the others.

    It adds ``N(0, σ²S²)`` to its own parameters' clipped sums (``S`` of all
    stages, from the settings), all-reduces nothing, and before each logical
    step checks that every stage is at the same logical step with the same σ.

    Args:
        *args: as :class:`DPOptimizer`.
        stages: the process group of the pipeline.
        **kwargs: as :class:`DPOptimizer` (without ``ranks``).
    """

    stages: distributed.Ranks

    def __init__(self, *args: Any, stages: distributed.Ranks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "stages", stages)

    def _stage_of_a_pipeline(self) -> bool:
        return True

    def step(self, closure: Any = None) -> Any:
        """Check every stage is at this logical step with this σ, then :meth:`DPOptimizer.step`.

        Raises:
            StepStructureError: the stages disagree (a skipped batch, or
                ``set_noise_multiplier`` on one stage only), or one did not come.
        """
        stamp = self.step_state.current
        if (stamp is not None and stamp.chunk == stamp.chunks - 1
                and stamp.logical > self.step_state.stepped):
            with distributed.step_collective():
                self.stages.rendezvous(f"optimizer.step() of logical step {stamp.logical}")
                distributed.check_same(
                    [float(stamp.logical), float(self.steps_taken), self.noise_multiplier],
                    "the logical step (index, steps taken) or the noise multiplier σ",
                    StepStructureError,
                    "Every stage must call optimizer.step() once per batch of dp.data_loader, "
                    "empty batches included, with the same noise multiplier (a noise schedule "
                    "on every stage alike).", group=self.stages.control)
        return super().step(closure)


class StageOutput:
    """A stage before the last: only the received gradient may reach its output.

    Such a stage has no loss for the engine to check, so its backward must be
    exactly ``∂L/∂h`` of the next stage, whose rows the next stage's engine
    keeps per example. :meth:`backward` (``dp.stage_backward(h, g)``) runs it;
    a hook on the stage's output refuses any other gradient: a term added on
    this stage (``h.backward(g)`` beside a regulariser of ``h``, a second
    backward) could couple examples unchecked.

    Args:
        model: the stage's model (its output must be one tensor).
    """

    def __init__(self, model: nn.Module) -> None:
        self.expected: Tensor | None = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise InvalidArgumentError(
                f"A pipeline stage before the last must return one tensor (the activations "
                f"sent to the next stage), got {type(output).__name__}.")
        if output.requires_grad:
            output.register_hook(self._check)

    def _check(self, grad: Tensor) -> None:
        g = self.expected
        if g is None:
            raise ExampleMixingError(
                "On a pipeline stage before the last, backpropagate the received gradient "
                "with dp.stage_backward(h, g), nothing else: this stage has no loss the "
                "engine can check, so any other backward through its output is refused.")
        if grad.shape != g.shape or not torch.equal(grad, g.to(grad.dtype)):
            raise ExampleMixingError(
                "The gradient reaching this pipeline stage's output is not the one received "
                "from the next stage: another term (a loss or regulariser on this stage's "
                "output) was backpropagated with it. It would couple examples unchecked; "
                "compute every loss on the last stage.")

    def backward(self, h: Tensor, g: Tensor) -> None:
        """Backpropagate the next stage's gradient ``g`` of this stage's output ``h``."""
        self.expected = g
        try:
            torch.autograd.backward([h], [g])
        finally:
            self.expected = None
