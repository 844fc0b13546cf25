"""``transformers.Trainer`` with differential privacy: :class:`DPTrainer`.

A ``Trainer`` subclass that hands the training loop swiftdp's pieces, so
everything else the Trainer does (logging, evaluation, LR schedules, callbacks)
keeps working:

* the train dataloader is ``dp.data_loader``: Poisson-sampled logical batches
  of expected size ``per_device_train_batch_size`` (the accountant's
  assumption), collated by the Trainer's own collator;
* the optimizer is the Trainer's own (``create_optimizer``: AdamW and weight
  decay groups), wrapped by ``make_private``: per-example clipping, noise once
  per step, the budget enforced before a step that would exceed it;
* the model's ``labels=`` loss is each example's own
  (:class:`swiftdp.hf.ModelLoss`); ``num_items_in_batch`` is dropped;
* ``epsilon`` is added to every log line.

Refused, with the fix: ``label_smoothing_factor`` (the Trainer's smoother
is a token mean over the batch), ``gradient_accumulation_steps > 1`` (use
``max_physical_batch_size`` in ``privacy``), resuming from a Trainer
checkpoint (it carries no accountant; ``dp.save_checkpoint`` saves one for
swiftdp's own loop), and more than one process (not supported yet).
The Trainer's own ``max_grad_norm`` clipping sees no gradient (the clipped,
noised gradient reaches ``p.grad`` only at the step) and is set to 0.

Example:
    >>> trainer = DPTrainer(model=model, args=args, train_dataset=ds,   # doctest: +SKIP
    ...                     privacy={"target_epsilon": 8.0, "delta": 1e-5,
    ...                              "max_grad_norm": 1.0})
    >>> trainer.train(); trainer.dp.epsilon()                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from torch.utils.data import DataLoader

from swiftdp.api.private import PrivateTraining, make_private
from swiftdp.errors import InvalidArgumentError


class DPTrainer(transformers.Trainer):  # type: ignore[misc]
    """A ``transformers.Trainer`` whose training steps are DP-SGD steps.

    Args:
        *args: as for ``transformers.Trainer``.
        privacy: keyword arguments of :func:`swiftdp.make_private`
            (``max_grad_norm`` and ``target_epsilon`` or ``noise_multiplier``
            required; ``delta``, ``accountant``, ``max_physical_batch_size``,
            ``secure``, ``seed``...). ``epochs`` / ``steps`` default to the
            Trainer's ``num_train_epochs`` / ``max_steps``.
        **kwargs: as for ``transformers.Trainer``.

    Attributes:
        dp: the :class:`swiftdp.PrivateTraining` (``None`` until training starts).

    Raises:
        InvalidArgumentError: ``privacy`` is missing or the Trainer's
            arguments are incompatible (see the module docstring).
    """

    def __init__(self, *args: Any, privacy: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not privacy or "max_grad_norm" not in privacy:
            raise InvalidArgumentError(
                "DPTrainer needs privacy={...}: the keyword arguments of swiftdp.make_private, "
                "at least max_grad_norm= and target_epsilon= (with delta=) or noise_multiplier=.")
        if self.args.gradient_accumulation_steps != 1:
            raise InvalidArgumentError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: a DP step "
                "must use exactly one logical batch. Set it to 1 and pass "
                "privacy={'max_physical_batch_size': ...} to split large logical batches.")
        if self.args.label_smoothing_factor:
            raise InvalidArgumentError(
                f"label_smoothing_factor={self.args.label_smoothing_factor}: the Trainer's label "
                "smoother averages over the real tokens of the whole batch, which couples the "
                "examples. Set it to 0 (the model's labels= loss is then each example's own).")
        if self.args.world_size > 1:
            raise InvalidArgumentError(
                f"DPTrainer runs in one process for now (world_size={self.args.world_size}).")
        self.args.max_grad_norm = 0.0  # nothing for it to clip: p.grad is set at the step
        self.privacy = dict(privacy)
        self.dp: PrivateTraining | None = None

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Train; refuses ``resume_from_checkpoint`` (a Trainer checkpoint has no accountant)."""
        if resume_from_checkpoint:
            raise InvalidArgumentError(
                "resume_from_checkpoint: a Trainer checkpoint does not carry the privacy "
                "accountant, so the budget spent would be forgotten. Resuming a DPTrainer run is "
                "not supported yet; trainer.dp.save_checkpoint(path) saves the model, optimizer, "
                "sampler and accountant for swiftdp's own loop (dp.load_checkpoint).")
        return super().train(None, *args, **kwargs)

    def get_train_dataloader(self) -> Any:
        """``dp.data_loader``, built (with the optimizer) on first use."""
        if self.dp is None:
            if self.train_dataset is None:
                raise InvalidArgumentError("DPTrainer: training requires a train_dataset.")
            collate = self._get_collator_with_removed_columns(self.data_collator,
                                                              description="Training")
            loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size,
                                collate_fn=collate)
            kw = dict(self.privacy)
            if "epochs" not in kw and "steps" not in kw:
                if self.args.max_steps and self.args.max_steps > 0:
                    kw["steps"] = int(self.args.max_steps)
                else:
                    kw["epochs"] = float(self.args.num_train_epochs)
            if not isinstance(self.model, nn.Module):
                raise InvalidArgumentError("DPTrainer: training requires a model.")
            self.dp = make_private(self.model, self.create_optimizer(), loader, **kw)
            self.optimizer = self.dp.optimizer
        return self.dp.data_loader

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log line, with the privacy spent so far."""
        if self.dp is not None and self.dp.steps:
            logs = {**logs, "epsilon": round(self.dp.epsilon(), 4)}
        super().log(logs, *args, **kwargs)


__all__ = ["DPTrainer"]
