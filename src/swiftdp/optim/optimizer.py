"""A wrapper that turns any ``torch.optim`` optimizer into a DP-SGD step.

The clipping engine hands each backward's clipped sums to
:meth:`DPOptimizer.receive`, which keeps them private (they never sit in
``p.grad``, where user code could read or change them) and checks the step's
structure: every backward belongs to the batch ``dp.data_loader`` drew for
this step, each physical chunk exactly once, one forward per backward. At the
end of each *logical* step :meth:`DPOptimizer.step`:

1. checks that every chunk of the logical batch was received;
2. asks the accountant what ε the step would bring and refuses it with
   :class:`~swiftdp.errors.PrivacyBudgetExceededError` before anything changes
   if that exceeds the target;
3. adds ``N(0, σ²C²)`` once to each trainable parameter's clipped sum, σ and C
   read from the one settings object the accountant reads too;
4. divides by the fixed expected batch size ``q·N`` (never the realised size)
   and writes the result to ``p.grad``;
5. runs the wrapped optimizer's step (SGD, Adam, AdamW, ...; LR schedulers
   attached to the wrapped optimizer keep working) — the only way that
   optimizer may step;
6. records the step in the accountant.

References:
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swiftdp import distributed
from swiftdp.accounting import PrivacyAccountant
from swiftdp.checks import check_noise_multiplier
from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.clipping.groups import check_clip_thresholds
from swiftdp.errors import InvalidArgumentError, StepStructureError
from swiftdp.optim.adaptive import updated_thresholds
from swiftdp.optim.budget import BudgetControl
from swiftdp.optim.noise import add_gaussian_noise, is_secure
from swiftdp.optim.thresholds import ThresholdControl
from swiftdp.settings import PrivacySettings

if TYPE_CHECKING:
    from swiftdp.clipping.engine import BackwardResult

# Attributes whose value is part of the privacy guarantee: they live in the
# settings object only (read by the noise and the accountant alike).
_GUARANTEE_ATTRS = frozenset({
    "max_grad_norm", "sample_rate", "expected_batch_size", "delta", "clipping",
    "target_epsilon", "accountant_name",
})

_ACCUMULATE_HINT = (
    "Gradient accumulation over several batches is what make_private's "
    "max_physical_batch_size= is for: dp.data_loader then yields the chunks of one "
    "logical batch and optimizer.step() adds the noise once after the last."
)


class _Accumulator:
    """One parameter's clipped sum in at least float32, noised before any cast."""

    __slots__ = ("dtype", "grad", "shape")

    def __init__(self, p: Tensor, clipped_sum: Tensor | None) -> None:
        self.dtype = torch.promote_types(p.dtype, torch.float32)
        self.shape = p.shape
        self.grad: Tensor | None = (
            torch.zeros(p.shape, dtype=self.dtype, device=p.device) if clipped_sum is None
            else clipped_sum.to(torch.promote_types(clipped_sum.dtype, torch.float32)))


@dataclass(frozen=True)
class Stamp:
    """Which batch ``dp.data_loader`` handed out last.

    Attributes:
        logical: index of the logical batch (counts up over the whole run).
        chunk: index of this physical chunk within the logical batch.
        chunks: number of physical chunks of the logical batch.
        size: number of examples in this chunk.
    """

    logical: int
    chunk: int
    chunks: int
    size: int


class StepState:
    """Shared between the data loader and the optimizer: the batch handed out last."""

    def __init__(self) -> None:
        self.current: Stamp | None = None
        self.drawn = 0  # logical batches handed out so far
        self.stepped = -1  # index of the last logical batch stepped

    @property
    def is_last_chunk(self) -> bool:
        """Whether the current chunk is the last of its logical batch (or none is current)."""
        c = self.current
        return c is None or c.chunk == c.chunks - 1


class DPOptimizer(ThresholdControl, BudgetControl, torch.optim.Optimizer):
    """Differentially private step around a ``torch.optim.Optimizer``.

    Args:
        optimizer: the wrapped optimizer (its param groups, state and LR
            schedulers are used as they are).
        params: the trainable parameters being privatised.
        settings: the privacy settings (σ, C, q, expected batch size, target).
        accountant: the accountant recording every step.
        generator: the noise generator.
        step_state: shared with the data loader (which batch is current).
        trainable: returns the parameters the clipping engine treats as
            trainable now (default: ``params``).
        ranks: the data-parallel process group (``None``: one process); every
            step all-reduces the ranks' noisy clipped sums over it.

    Raises:
        StepStructureError: from :meth:`receive` and :meth:`step` when a step
            does not see exactly one logical batch, each chunk once.
    """

    original_optimizer: torch.optim.Optimizer
    params: list[Tensor]
    accountant: PrivacyAccountant
    generator: torch.Generator
    step_state: StepState
    steps_taken: int
    _settings: PrivacySettings
    _trainable: Callable[[], list[Tensor]]
    _verified_steps: int
    _verified_sigma: float | None
    _sums: dict[int, Tensor]
    _sum_params: dict[int, Tensor]
    _chunks_seen: set[int]
    _logical: int | None
    _in_step: bool
    ranks: distributed.Ranks | None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        settings: PrivacySettings,
        accountant: PrivacyAccountant,
        generator: torch.Generator,
        step_state: StepState | None = None,
        trainable: Callable[[], list[Tensor]] | None = None,
        ranks: distributed.Ranks | None = None,
    ) -> None:
        # Not calling Optimizer.__init__: parameter groups and state are the
        # wrapped optimizer's own (shared, not copied), so LR schedulers built
        # on either object act on the same learning rates.
        set_ = object.__setattr__
        set_(self, "original_optimizer", optimizer)
        set_(self, "_optimizer_step_pre_hooks", {})
        set_(self, "_optimizer_step_post_hooks", {})
        set_(self, "params", params)
        set_(self, "_settings", settings)
        set_(self, "accountant", accountant)
        set_(self, "generator", generator)
        set_(self, "step_state", step_state or StepState())
        set_(self, "_trainable", trainable or (lambda: list(params)))
        set_(self, "steps_taken", 0)
        # The process group, fixed by make_private (one initialised later changes nothing).
        set_(self, "ranks", ranks)
        # Largest step count verified to stay within the budget for a history
        # made only of (noise_multiplier, sample_rate) steps: ε grows with the
        # number of steps, so any count up to it is within budget too.
        set_(self, "_verified_steps", 0)
        set_(self, "_verified_sigma", None)  # the σ that count was verified for
        # The private accumulator of the logical step in progress.
        set_(self, "_sums", {})
        set_(self, "_sum_params", {})
        set_(self, "_chunks_seen", set())
        set_(self, "_logical", None)
        set_(self, "_in_step", False)
        # Adaptive clipping: this logical step's count of examples within their
        # threshold (per group), and of examples.
        set_(self, "_within", None)
        set_(self, "_examples", 0)
        # Where a new threshold goes besides the settings (the engine), and the schedules.
        set_(self, "_engine_thresholds", lambda thresholds: None)
        set_(self, "_noise_schedule", None)
        set_(self, "_clip_schedule", None)
        set_(self, "_initial_thresholds", settings.max_grad_norm)
        if getattr(optimizer, "_swiftdp_wrapped", False):
            raise StepStructureError(
                "This optimizer is already wrapped by make_private (a DPOptimizer steps it). "
                "Build a new optimizer for a new private run."
            )
        optimizer._swiftdp_wrapped = True  # type: ignore[attr-defined]
        set_(self, "_guard", optimizer.register_step_pre_hook(self._refuse_direct_step))

    # ------------------------------------------------ one source of σ and C
    @property
    def settings(self) -> PrivacySettings:
        """The privacy settings in force (σ, C, q, δ, ...): the one source of each value."""
        return self._settings

    @property
    def initial_max_grad_norm(self) -> Thresholds:
        """The run's first clipping threshold (a schedule or adaptive clipping moves it)."""
        return self._initial_thresholds  # type: ignore[no-any-return]

    @property
    def noise_multiplier(self) -> float:
        """σ of the next step (as the accountant will record it)."""
        return self._settings.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self.set_noise_multiplier(value)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Change σ from the next step on; the noise and the accountant both use it.

        Args:
            noise_multiplier: the new σ (≥ 0).

        Raises:
            InvalidArgumentError: ``noise_multiplier`` is negative or not a number,
                or too large for adaptive clipping's count noise (the counts
                alone would spend more than the step may).
        """
        check_noise_multiplier(noise_multiplier)
        a = self._settings.adaptive
        if a is not None and noise_multiplier > 0:
            assert a.count_noise is not None
            needed = float(noise_multiplier) * math.sqrt(self._settings.groups()) / 2
            if not a.count_noise > needed:
                raise InvalidArgumentError(
                    f"noise_multiplier={noise_multiplier:g} is too large for adaptive "
                    f"clipping's count_noise={a.count_noise:g}: the counts and the gradient "
                    f"are one Gaussian of multiplier σ only while count_noise > σ·√K/2 = "
                    f"{needed:g}. Keep σ below {2 * a.count_noise / math.sqrt(self._settings.groups()):g} "
                    "or pass a larger AdaptiveClipping(count_noise=).")
        object.__setattr__(
            self, "_settings", dataclasses.replace(self._settings,
                                                   noise_multiplier=float(noise_multiplier)))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _GUARANTEE_ATTRS or name in ("settings", "accountant", "generator", "ranks"):
            raise AttributeError(
                f"Cannot set `{name}` on a DPOptimizer: it is part of the privacy guarantee "
                "and fixed for the run (the noise and the accountant read it from one "
                "settings object). Only σ may change during a run, through "
                "set_noise_multiplier(σ)."
            )
        object.__setattr__(self, name, value)

    def _refuse_direct_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._in_step:
            raise StepStructureError(
                "The optimizer given to make_private was stepped directly. Its parameters "
                "would move by un-noised (or no) gradients, outside the accounting. Call "
                "dp.optimizer.step() (the DPOptimizer) instead."
            )

    # --------------------------------------------- the private accumulator
    def receive(self, result: BackwardResult) -> None:
        """Keep one backward's clipped sums privately, after checking where they came from.

        Called by the clipping engine at the end of each backward.

        Raises:
            StepStructureError: the backward is not the one backward of the
                current chunk of ``dp.data_loader``'s current logical batch.
        """
        stamp = self.step_state.current
        if stamp is None:
            raise StepStructureError(
                "A backward pass ran on a batch that did not come from dp.data_loader (no "
                "batch of it is current). Iterate dp.data_loader, not the original loader: "
                "the accounting assumes its Poisson-sampled batches."
            )
        if stamp.logical <= self.step_state.stepped:
            raise StepStructureError(
                "A backward pass on a batch that optimizer.step() already consumed: each "
                "logical batch dp.data_loader draws is stepped once. Draw the next batch "
                "from dp.data_loader."
            )
        if result.forwards != 1:
            raise StepStructureError(
                f"One backward pass differentiated {result.forwards} forward passes of the "
                "model. A DP step must see the current batch once, through one call "
                "`model(batch)` (not model.forward, not several calls). " + _ACCUMULATE_HINT
            )
        if result.batch_size != stamp.size:
            raise StepStructureError(
                f"The backward's forward had a batch of {result.batch_size} examples, but the "
                f"batch dp.data_loader handed out has {stamp.size}. Run the model once on the "
                "whole batch it yields (no manual micro-batches). " + _ACCUMULATE_HINT
            )
        if self._logical is not None and self._logical != stamp.logical:
            self._discard()
            raise StepStructureError(
                "A backward pass on a new logical batch came before optimizer.step() of the "
                "previous one; the previous batch's clipped sums were discarded. Call "
                "optimizer.step() once after each logical batch. " + _ACCUMULATE_HINT
            )
        if stamp.chunk in self._chunks_seen:
            raise StepStructureError(
                "A second backward pass over the same examples before optimizer.step(): each "
                "example may contribute once per step. Call optimizer.step() after each "
                "backward. " + _ACCUMULATE_HINT
            )
        if self._sums and set(self._sums) != {id(p) for p, _ in result.sums}:
            self._discard()
            raise StepStructureError(
                "The set of trainable parameters changed between the chunks of one logical "
                "batch. Freeze or unfreeze parameters between steps only."
            )
        if result.thresholds != self._settings.clip_thresholds():
            self._discard()
            raise StepStructureError(
                f"This backward clipped the examples to {result.thresholds!r}, but the noise "
                f"is calibrated to {self._settings.clip_thresholds()!r}: the threshold was "
                "changed on the engine only. Change it with dp.set_max_grad_norm(C) (or a "
                "clip schedule), between steps; the clipped sums were discarded.")
        object.__setattr__(self, "_logical", stamp.logical)
        self._chunks_seen.add(stamp.chunk)
        if result.within is not None:
            prev_within = self._within
            object.__setattr__(self, "_within", result.within if prev_within is None
                               else prev_within + result.within)
        object.__setattr__(self, "_examples", self._examples + result.batch_size)
        for p, sm in result.sums:
            prev = self._sums.get(id(p))
            self._sums[id(p)] = sm if prev is None else prev + sm
            self._sum_params[id(p)] = p

    def _discard(self) -> None:
        object.__setattr__(self, "_within", None)
        object.__setattr__(self, "_examples", 0)
        self._sums.clear()
        self._sum_params.clear()
        self._chunks_seen.clear()
        object.__setattr__(self, "_logical", None)

    # Delegation so that the wrapper can be used where an optimizer is expected.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The wrapped optimizer's state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (the clipped sums of a step in progress are kept privately)."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Finish a logical step: budget check, noise, scale, optimiser step, accounting.

        In the middle of a logical batch split into physical chunks it does
        nothing (the clipped sums keep accumulating).

        Returns:
            The wrapped optimizer's return value, or ``None`` when deferred.

        Raises:
            PrivacyBudgetExceededError: raised before any parameter changes.
        """
        if closure is not None:
            raise ValueError(
                "DPOptimizer.step does not take a closure: run the forward and backward "
                "before calling step()."
            )
        stamp = self.step_state.current
        if stamp is None:
            raise StepStructureError(
                "optimizer.step() was called with no batch of dp.data_loader current. Draw "
                "each step's batch from dp.data_loader and call step() once after its backward."
            )
        if stamp.logical <= self.step_state.stepped:
            raise StepStructureError(
                "optimizer.step() was called again for a logical batch it already stepped. "
                "Draw the next batch from dp.data_loader; every batch is stepped once."
            )
        if self._logical is not None and self._logical != stamp.logical:
            self._discard()
            raise StepStructureError(
                "optimizer.step() was called for a logical batch whose backward never ran, "
                "while clipped sums of an earlier batch were waiting; they were discarded. "
                "Call optimizer.step() once after each logical batch."
            )
        if stamp.chunk != stamp.chunks - 1:
            if stamp.chunk not in self._chunks_seen:
                raise StepStructureError(
                    f"optimizer.step() after chunk {stamp.chunk + 1} of {stamp.chunks} of a "
                    "logical batch whose backward did not run. Run the backward on every "
                    "chunk dp.data_loader yields."
                )
            return None  # mid logical batch: the clipped sums keep accumulating
        if len(self._chunks_seen) != stamp.chunks and stamp.size + len(self._chunks_seen) > 0:
            missing = stamp.chunks - len(self._chunks_seen)
            raise StepStructureError(
                f"optimizer.step() with {missing} of the {stamp.chunks} chunk(s) of the logical "
                "batch not backpropagated: a partial logical batch is not what the accountant "
                "analyses. Run one forward and backward on every batch dp.data_loader yields "
                "before step() (an empty batch needs none: step() adds the noise only)."
            )
        self.check_budget()
        s = self.settings
        sums = self._sums
        ranks = self.ranks
        world = 1 if ranks is None else ranks.world
        if ranks is None and distributed.active() and not self._stage_of_a_pipeline():
            raise StepStructureError(
                "A torch.distributed process group of several ranks was initialised after "
                "make_private: this run was set up for one process, so every rank would "
                "train on its own full Poisson sample and report the ε of one run, while "
                "the ranks together release more. Call init_process_group before "
                "make_private (it then trains data-parallel).")
        # In a process group every rank reduces the same list, in the model's order.
        params = (self._trainable() if world > 1 or not sums
                  else list(self._sum_params.values()))
        trainable_ids = {id(p) for p in params}
        self._check_optimizer_params(trainable_ids)
        for p in self.params:
            if id(p) not in trainable_ids:
                p.grad = None  # frozen since make_private: not updated
        # The clipped sums stay in at least float32 until the noise is in: a
        # rounding to a low-precision parameter dtype (bf16) before the noise
        # would depend on every example, outside the sensitivity bound.
        accs = [_Accumulator(p, sums.get(id(p))) for p in params]
        if ranks is not None:
            with distributed.step_collective():
                ranks.rendezvous(f"optimizer.step() of logical step {stamp.logical}")
                # The same logical step, σ and parameters on every rank, or all refuse.
                distributed.check_same(
                    [float(stamp.logical), float(self.steps_taken), s.noise_multiplier,
                     s.sensitivity(), float(sum(a.shape.numel() for a in accs))],
                    "the logical step (index, steps taken), the noise multiplier σ, the "
                    "sensitivity (clipping thresholds) or the "
                    "trainable parameters' size",
                    StepStructureError,
                    "Every rank must call optimizer.step() once per batch of dp.data_loader, "
                    "empty batches included, with the same noise multiplier and parameters.",
                    group=ranks.control)
                # Each rank adds its independent share N(0, σ²C²/W); the all-reduce sums
                # shares and clipped sums: the total noise is N(0, σ²C²) (swiftdp.distributed).
                # Bucketed: a bucket's all-reduce overlaps drawing the next one's noise.
                share = s.noise_std() / math.sqrt(world)
                distributed.noisy_all_reduce(
                    accs, lambda bucket: add_gaussian_noise(bucket, share, self.generator))
        else:
            add_gaussian_noise(accs, s.noise_std(), self.generator)
        fractions = self._noised_fractions(world) if s.adaptive is not None else None
        for p, acc in zip(params, accs, strict=True):
            assert acc.grad is not None
            p.grad = acc.grad.div_(s.expected_batch_size).to(p.dtype)
        self._discard()
        # The noised gradient now sits in p.grad: from here on it counts as
        # released, so the step is accounted before the wrapped optimizer runs
        # (if it raises, the batch is still consumed and accounted).
        self.accountant.step(s.noise_multiplier, s.sample_rate, 1)
        self.step_state.stepped = stamp.logical
        object.__setattr__(self, "steps_taken", self.steps_taken + 1)
        # The next step's σ and C: from the schedules, or adapted from the released counts.
        if fractions is not None:
            assert s.adaptive is not None
            self._set_thresholds(updated_thresholds(s.max_grad_norm, fractions, s.adaptive))
        self._apply_schedules()
        object.__setattr__(self, "_in_step", True)
        try:
            out = self.original_optimizer.step()
        finally:
            object.__setattr__(self, "_in_step", False)
        if ranks is not None and ranks.debug:
            ranks.check_identical(params, f"after optimizer.step() of logical step {stamp.logical}")
        return out

    def _stage_of_a_pipeline(self) -> bool:
        """Whether this is a pipeline stage's optimizer (no all-reduce by design)."""
        return False

    def _check_optimizer_params(self, tracked: set[int]) -> None:
        """Refuse optimizer parameters the engine does not clip (they would move unclipped)."""
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in tracked and p.grad is not None:
                    raise StepStructureError(
                        f"The optimizer holds a trainable parameter of shape {tuple(p.shape)} "
                        "that is not a parameter of the model, and it has a gradient that "
                        "swiftdp did not clip. Register it in the model (and use it in the "
                        "forward) or freeze it with requires_grad_(False)."
                    )

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state plus the noise generator's state (seeded mode only)."""
        return {
            "optimizer": self.original_optimizer.state_dict(),
            # A secure generator's state is never handed out: with the next
            # released model it would reveal this step's noise-free sum.
            "noise_generator": None if is_secure(self.generator) else self.generator.get_state(),
            "noise_multiplier": self.noise_multiplier,
            "steps_taken": self.steps_taken,
            # A schedule or adaptive clipping moves C: the current one, and the first.
            "max_grad_norm": self._settings.max_grad_norm,
            "initial_max_grad_norm": self._initial_thresholds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` saved."""
        self.original_optimizer.load_state_dict(state["optimizer"])
        if state.get("noise_generator") is not None:
            self.generator.set_state(state["noise_generator"])
        self.set_noise_multiplier(float(state["noise_multiplier"]))
        object.__setattr__(self, "steps_taken", int(state["steps_taken"]))
        if state.get("max_grad_norm") is not None:
            self._set_thresholds(check_clip_thresholds(state["max_grad_norm"]))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the privatised parameter set is fixed when the run starts."""
        raise ValueError(
            "Cannot add a parameter group to a DPOptimizer: the parameters under privacy "
            "are fixed by make_private. Build the optimizer with all parameter groups first."
        )

    def __getattr__(self, name: str) -> Any:
        if name == "original_optimizer":
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)
