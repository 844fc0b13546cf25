"""What ``make_private`` returns: the private training run and its data loader."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from swiftdp.accounting import PrivacyAccountant
from swiftdp.api import checkpoint as ckpt
from swiftdp.checks import (
    check_delta,
)
from swiftdp.clipping.engine import GradClipper
from swiftdp.data.augment import Views
from swiftdp.errors import InvalidArgumentError, StepStructureError
from swiftdp.optim.optimizer import DPOptimizer, Stamp, StepState
from swiftdp.sampling import LogicalBatch
from swiftdp.sampling.physical import batch_size_of
from swiftdp.settings import PrivacySettings, SpeedSettings

__all__ = ["DPDataLoader", "PrivateTraining"]


class DPDataLoader:
    """Iterates logical batches (or their physical chunks) and tells the optimizer which.

    Attributes:
        loader: the underlying (Poisson-sampled) ``DataLoader``.
        max_physical_batch_size: chunk size limit, or ``None``.
        views: with augmentation multiplicity, what turns each batch (chunk)
            into ``K`` views of each example (:class:`swiftdp.data.augment.Views`).
    """

    def __init__(self, loader: DataLoader[Any], step_state: StepState,
                 max_physical_batch_size: int | None, views: Views | None = None) -> None:
        self.loader = loader
        self.step_state = step_state
        self.max_physical_batch_size = max_physical_batch_size
        self.views = views
        self.steps_in_epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:
        """The dataset being sampled."""
        return self.loader.dataset

    def __iter__(self) -> Iterator[Any]:
        """Yield each logical batch (or its chunks), stamped for the optimizer's checks.

        Raises:
            StepStructureError: the previous batch of this iteration was never
                stepped (every drawn batch must end in one ``optimizer.step()``,
                an empty one included: skipping steps is not what the
                accountant analyses).
        """
        st = self.step_state
        batches = iter(self.loader)
        # Counted from where the sampler's epoch resumes (> 0 after a mid-epoch
        # resume), so that a later checkpoint records the true position.
        sampler = getattr(self.loader, "poisson_sampler", None)
        self.steps_in_epoch = sampler.iteration_start if sampler is not None else 0
        for batch in batches:
            k = st.drawn
            if st.stepped != k - 1:
                raise StepStructureError(
                    "dp.data_loader was asked for its next batch, but optimizer.step() "
                    "was not called for the previous one. Every batch it draws must end "
                    "in exactly one optimizer.step() — an empty batch too (the step then "
                    "adds noise only): skipping steps changes what is released, which "
                    "the accountant does not analyse. To accumulate gradients over several "
                    "batches, pass max_physical_batch_size= to make_private instead."
                )
            st.drawn = k + 1
            self.steps_in_epoch += 1
            views = self.views if self.views is not None else (lambda b: b)
            if self.max_physical_batch_size is None:
                st.current = Stamp(k, 0, 1, batch_size_of(batch))
                yield views(batch)
                continue
            lb = LogicalBatch(batch, self.max_physical_batch_size)
            for i, (chunk, _) in enumerate(lb):
                st.current = Stamp(k, i, lb.num_chunks, batch_size_of(chunk))
                yield views(chunk)  # augmented chunk by chunk: K views of a chunk in memory
        # Exhausted: no batch is current. (A loop left early keeps its last batch
        # current: it was handed out, so its backward and step are still legitimate.)
        st.current = None


class PrivateTraining:
    """What :func:`make_private` returns: the model, optimizer and loader to train with.

    Attributes:
        model: the user's model, unchanged, with the clipping engine attached.
        optimizer: a :class:`DPOptimizer` around the user's optimizer.
        data_loader: the Poisson-sampled loader (yields physical chunks when
            ``max_physical_batch_size`` is set).
        clipper: the clipping engine.
        accountant: the privacy accountant (history of σ, q, steps).
        privacy: the :class:`PrivacySettings` in force.
        speed: the :class:`SpeedSettings` in force.
    """

    def __init__(self, model: nn.Module, optimizer: DPOptimizer, data_loader: DPDataLoader,
                 clipper: GradClipper, accountant: PrivacyAccountant,
                 speed: SpeedSettings, num_samples: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.clipper = clipper
        self.accountant = accountant
        self.speed = speed
        self.num_samples = num_samples

    @property
    def privacy(self) -> PrivacySettings:
        """The privacy settings in force: the optimizer's, which the accountant reads too."""
        return self.optimizer.settings

    def backward(self, losses: Tensor) -> None:
        """Backpropagate one loss per example (see :meth:`GradClipper.backward`).

        The documented way for sequence models with padding and any loss whose
        library reduction couples examples: pass ``(B,)`` losses, each reduced
        over its example's own tokens (:mod:`swiftdp.losses`).
        """
        self.clipper.backward(losses)

    def _link(self, call: str) -> Any:
        link = getattr(self.optimizer, "link", None)
        if link is None:
            raise InvalidArgumentError(
                f"{call} is for pipeline stages (make_private(pipeline_stage=k)); elsewhere "
                "call loss.backward() or dp.backward(losses).")
        return link

    def receive_activations(self) -> Tensor:
        """On a pipeline stage after the first: the previous stage's activations.

        Run the model on the returned tensor itself; its gradient goes back to
        the previous stage once this stage's backward is accepted
        (:mod:`swiftdp.pipeline`).

        Raises:
            InvalidArgumentError: not a pipeline stage after the first.
        """
        return self._link("dp.receive_activations()").receive()  # type: ignore[no-any-return]

    def send_activations(self, h: Tensor) -> None:
        """On a pipeline stage before the last: send this step's model output ``h`` on.

        Raises:
            InvalidArgumentError: not a pipeline stage before the last.
            ExampleMixingError: ``h`` is not the model's output of this step
                as it returned.
        """
        self._link("dp.send_activations(h)").send(h)

    def stage_backward(self) -> None:
        """On a pipeline stage before the last: backpropagate the next stage's gradient.

        Receives the gradient of the activations sent with
        :meth:`send_activations` and backpropagates it from them: the only
        backward such a stage may run.

        Raises:
            InvalidArgumentError: not a pipeline stage.
            StepStructureError: nothing was sent in this step.
        """
        self._link("dp.stage_backward()").backward()

    def set_max_grad_norm(self, max_grad_norm: float | Mapping[str, float] | Sequence[float]
                          ) -> None:
        """Change the clipping threshold from the next step on; clipping and noise both follow.

        Args:
            max_grad_norm: the new ``C`` (or ``{prefix: C_k}`` for the same
                groups, ``[C_0, ...]`` on a pipeline stage).
        """
        self.optimizer.set_max_grad_norm(max_grad_norm)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Change σ from the next step on (a noise schedule); noise and accountant both follow.

        Args:
            noise_multiplier: the new σ (≥ 0).
        """
        self.optimizer.set_noise_multiplier(noise_multiplier)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the run's δ)."""
        d = self.privacy.delta if delta is None else delta
        check_delta(d)
        return self.accountant.epsilon(d)

    @property
    def steps(self) -> int:
        """Logical steps taken (and accounted) so far."""
        return self.accountant.total_steps

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write model, optimizer, accountant, sampler and noise states atomically.

        Call it between logical steps (after ``optimizer.step()``). The file
        is written to a temporary name and renamed, so a crash never leaves a
        half-written checkpoint; it carries a SHA-256 checksum and a
        fingerprint of the training data (see :mod:`swiftdp.api.checkpoint`).

        Privacy: in seeded mode (``secure=False``) the file holds the noise
        generator's state, from which the noise of every later step can be
        regenerated and removed from a released model: **the checkpoint is
        as secret as the training data**. With ``secure=True`` the generator
        state is never written and a resumed run draws fresh OS entropy.

        Args:
            path: the checkpoint file.
            extra: your own values to store (tensors and plain values only).

        Raises:
            InvalidArgumentError: ``extra`` holds a value other than tensors
                and plain values (dict, list, tuple, str, numbers, None).
        """
        ckpt.save(self, Path(path), extra or {})

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns its ``extra``.

        Args:
            path: the checkpoint file.

        Returns:
            The ``extra`` dict given to :meth:`save_checkpoint`.

        Raises:
            CheckpointError: the file is missing, damaged (checksum), from an
                older format, or belongs to a different run (privacy settings,
                ``secure``, dataset content or model). The run is unchanged then.
        """
        return ckpt.load(self, Path(path))

    def detach(self) -> None:
        """Remove the clipping engine's hooks (and a pipeline stage's link) from the model."""
        self.clipper.remove()
        link = getattr(self.optimizer, "link", None)
        if link is not None:
            link.remove()
