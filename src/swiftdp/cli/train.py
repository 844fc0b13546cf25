"""The training loop of ``swiftdp train``: DP-SGD (or the non-private baseline) with
per-epoch evaluation, metrics, atomic checkpoints and resumption.

Privacy: the trained parameters only ever see the data through
:func:`swiftdp.make_private` (Poisson sampling, per-example clipping,
Gaussian noise, accounting, budget enforcement; σ and C may follow a
schedule, and C may adapt from noised counts released and accounted with
the step: :mod:`swiftdp.cli.privacy`). The evaluated and saved model is an
average of those parameters (:class:`swiftdp.ParameterAverage`: ``--ema``,
``--polyak``) or the parameters themselves, and cached frozen features are
per-example functions fixed before seeing data: both are post-processing
and cost no privacy.

Not covered by the guarantee: the training loss and training accuracy shown
in the progress bar and written to ``metrics.json`` are computed on the
private training examples as they are used. They are for the person running
the job; do not publish them with the model. Test accuracy (perplexity, for
text) is computed from the model and the (public) test split only.

For ``--dataset text`` one example is one block of ``--seq-len`` bytes of the
file (:mod:`swiftdp.data.text`): the guarantee protects any one block, not a
person or a document that spans several.
"""

from __future__ import annotations

import copy
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from swiftdp.api.private import PrivateTraining
from swiftdp.audit.inputs import InputCanaries
from swiftdp.averaging import ParameterAverage
from swiftdp.cli import rundir
from swiftdp.cli.options import TrainConfig
from swiftdp.cli.parallel import on_rank0, sum_over_ranks
from swiftdp.cli.privacy import (
    augment_for,
    make_run_private,
    parameter_average,
    plan_of,
    total_clip,
)
from swiftdp.cli.setup import Prepared
from swiftdp.data.augment import Views
from swiftdp.errors import CheckpointError
from swiftdp.io import atomic_torch_save

NONPRIVATE_FORMAT = "swiftdp-cli-nonprivate"
PRIVACY_NOTE = (
    "The model is (epsilon, delta)-DP for the training split (one example: one image, or one "
    "block of the text file). loss and train_accuracy / train_perplexity are computed on the "
    "training examples without privacy protection: do not publish them."
)


def _after_step(step: int) -> None:
    """Called after every logical step with the number of steps taken (a test seam)."""


class Trainer:
    """One run: builds the optimizer (and ``make_private``), trains, evaluates, saves.

    Args:
        cfg: the resolved options.
        prep: data, model and device from :func:`~swiftdp.cli.setup.prepare`.
        run_dir: the run folder.
    """

    def __init__(self, cfg: TrainConfig, prep: Prepared, run_dir: Path) -> None:
        self.cfg, self.prep, self.run_dir = cfg, prep, run_dir
        model = prep.trainable
        # The evaluated copy, without the engine's hooks: it is loaded with the
        # average of the trained parameters (post-processing) before each evaluation.
        self.eval_model = copy.deepcopy(model).eval()
        for p in self.eval_model.parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        else:
            opt = torch.optim.Adam(params, lr=cfg.lr)
        ds = prep.train.dataset()
        self.dp: PrivateTraining | None = None
        self.plan = plan_of(cfg)
        # The baseline takes the same views (the private loader makes its own).
        self.views: Views | None = None
        self.call: Any = model
        if cfg.non_private:
            augment = augment_for(cfg)
            if cfg.augmult > 1 or augment is not None:
                self.views = Views(cfg.augmult, augment)
            if cfg.augmult > 1:
                self.call = _ViewsAsRows(model)
            self.generator = torch.Generator().manual_seed(prep.seed)
            self.loader: Any = DataLoader(ds, batch_size=prep.batch_size, shuffle=True,
                                          generator=self.generator)
            self.optimizer: torch.optim.Optimizer = opt
        else:
            self.dp = make_run_private(cfg, self.plan, model, opt, ds, prep.batch_size)
            self.loader = self.dp.data_loader
            self.optimizer = self.dp.optimizer
        self.model = model
        # After make_private, which copied rank 0's parameters in a process group.
        self.average: ParameterAverage | None = parameter_average(
            cfg, model, self.steps_per_epoch * cfg.epochs)
        self.clip_used: float | None = None  # the C of the last step taken
        self.epoch = 0
        self.saved_epoch = 0  # the epoch of the checkpoint on disk
        self.steps = 0
        self._eps_shown = 0.0
        self._eps_shown_at = 0.0
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        # --audit-inputs: the canaries and their model inputs (swiftdp.cli.canaries).
        self.input_canaries: tuple[InputCanaries, Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Logical steps in one epoch."""
        return len(self.loader)

    def epsilon(self) -> float:
        """ε spent so far (``inf`` for the non-private baseline)."""
        return float("inf") if self.dp is None else self.dp.epsilon()

    def sigmas(self) -> tuple[float, float] | None:
        """σ of the first and of the last step taken (``None`` before any, or non-private)."""
        history = self.dp.accountant.history if self.dp is not None else ()
        if not history:
            return None
        return history[0].noise_multiplier, history[-1].noise_multiplier

    def clip_norms(self) -> tuple[float, float] | None:
        """C of the first step and of the last step taken (``None`` when non-private)."""
        if self.dp is None:
            return None
        first = total_clip(self.dp.optimizer.initial_max_grad_norm)
        return first, first if self.clip_used is None else self.clip_used

    def train_epoch(self, progress: bool) -> dict[str, float]:
        """Run one epoch; returns its mean loss and training metric (``train_<metric>``)."""
        dev, task = self.prep.device, self.prep.task
        loss_sum, hits, seen = 0.0, 0.0, 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   unit="step", disable=not progress, leave=True, file=sys.stderr,
                   dynamic_ncols=True)
        self.model.train()
        for x, y in self.loader:
            if self.views is not None:
                x, y = self.views((x, y))
            x, y = x.to(dev), y.to(dev)
            self.optimizer.zero_grad()
            if len(y):  # an empty Poisson batch needs no backward: its step adds noise only
                batch = task.batch_loss(self.call, x, y, summed=self.dp is not None)
                batch.loss.backward()
                loss_sum += batch.total
                hits += batch.hits
                seen += len(y)
            before = self.dp.steps if self.dp is not None else self.steps
            # The C this step clips to (a schedule or adaptive clipping moves it after).
            clip = None if self.dp is None else total_clip(self.dp.privacy.max_grad_norm)
            self.optimizer.step()
            if self.dp is not None and self.dp.steps == before:
                continue  # a physical chunk of a logical batch; the step is not complete
            self.steps += 1
            self.clip_used = clip
            if self.average is not None:
                self.average.update()
            bar.update(1)
            post = {"loss": f"{loss_sum / max(seen, 1):.3f}",
                    task.short: f"{task.train_metric(loss_sum, hits, seen):.3f}"}
            if self.dp is not None and progress:
                # ε costs a PLD composition: refresh it at most every 2 s and at epoch end.
                now = time.monotonic()
                if bar.n >= (bar.total or 0) or now - self._eps_shown_at > 2.0:
                    self._eps_shown = self.dp.epsilon()
                    self._eps_shown_at = now
                post["ε"] = f"{self._eps_shown:.3f}"
            bar.set_postfix(post)
            _after_step(self.steps)
        bar.close()
        # Over every rank's share of the batches (the one-process figures); collective.
        loss_sum, hits, total = sum_over_ranks([loss_sum, hits, float(seen)])
        seen = int(total)
        return {"loss": loss_sum / max(seen, 1),
                f"train_{task.metric}": task.train_metric(loss_sum, hits, seen)}

    def evaluated_state_dict(self) -> dict[str, Tensor]:
        """The weights that are evaluated and saved: the average's, or the trained ones."""
        if self.average is not None:
            return self.average.averaged_state_dict()
        return self.model.state_dict()

    def evaluate(self) -> float:
        """The task's metric (accuracy, perplexity) of the evaluated weights on the evaluation split."""
        self.eval_model.load_state_dict(self.evaluated_state_dict())
        return self.prep.task.evaluate(self.eval_model, self.prep.evaluation, self.prep.device)

    @property
    def eval_key(self) -> str:
        """The metrics key of the evaluated metric: ``test_accuracy``, ``validation_perplexity``."""
        return f"{self.prep.eval_name}_{self.prep.task.metric}"

    def record(self, stats: dict[str, float], elapsed: float) -> dict[str, Any]:
        """Append the epoch's metrics to the history; returns them."""
        train_key = f"train_{self.prep.task.metric}"
        row = {"epoch": self.epoch, "loss": stats["loss"], train_key: stats[train_key],
               self.eval_key: self.evaluate(),
               "epsilon": self.epsilon(), "steps": self.steps, "elapsed_s": elapsed}
        sigmas, clips = self.sigmas(), self.clip_norms()
        if sigmas is not None and clips is not None:  # of the epoch's last step
            row.update({"noise_multiplier": sigmas[1], "max_grad_norm": clips[1]})
        self.history.append(row)
        return row

    # -- checkpoints ---------------------------------------------------------------

    def _extra(self, elapsed: float) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "history": self.history,
                "average": None if self.average is None else self.average.state_dict(),
                "clip_used": self.clip_used, "elapsed_s": elapsed}

    def save(self, elapsed: float) -> None:
        """Write the checkpoint of the last complete epoch (atomically)."""
        path = self.run_dir / rundir.CHECKPOINT
        if self.dp is not None:
            self.dp.save_checkpoint(path, extra=self._extra(elapsed))
        else:
            atomic_torch_save({"format": NONPRIVATE_FORMAT, "model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict(),
                               "generator": self.generator.get_state(),
                               "extra": self._extra(elapsed)}, path)
        self.saved_epoch = self.epoch

    def load(self, path: Path) -> None:
        """Restore the state saved by :meth:`save`.

        Raises:
            CheckpointError: missing, corrupt or belonging to another run.
        """
        if self.dp is not None:
            extra = self.dp.load_checkpoint(path)
        else:
            if not path.is_file():
                raise CheckpointError(f"Checkpoint `{path}` does not exist.")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise CheckpointError(f"Checkpoint `{path}` is corrupt ({type(e).__name__}).") from None
            if not isinstance(obj, dict) or obj.get("format") != NONPRIVATE_FORMAT:
                raise CheckpointError(
                    f"Checkpoint `{path}` is not a non-private swiftdp run; resume without "
                    "--non-private."
                )
            try:
                self.model.load_state_dict(obj["model"])
            except RuntimeError as e:
                raise CheckpointError(f"Checkpoint `{path}` does not match the model: {e}") from None
            self.optimizer.load_state_dict(obj["optimizer"])
            self.generator.set_state(obj["generator"])
            extra = obj["extra"]
        if "average" not in extra and "eval_model" in extra:
            raise CheckpointError(
                f"Checkpoint `{path}` was written by an earlier `swiftdp train` (its averaged "
                "weights are `eval_model`, not a ParameterAverage): finish the run with that "
                "version, or start a new run.")
        try:
            average = extra["average"]
            if (average is None) != (self.average is None):
                raise CheckpointError(
                    f"Checkpoint `{path}` {'has no' if average is None else 'has a'} weight "
                    f"average, but the run's config.yaml says {_averaging(self.cfg)}: it "
                    "belongs to another run.")
            if self.average is not None:
                self.average.load_state_dict(average)
            self.clip_used = extra["clip_used"]
            self.epoch, self.steps = int(extra["epoch"]), int(extra["steps"])
            self.saved_epoch = self.epoch
            self.history = list(extra["history"])
            self.elapsed_before = float(extra["elapsed_s"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"Checkpoint `{path}` was not written by `swiftdp train` ({e})."
            ) from None

    def final_state_dict(self) -> dict[str, Tensor]:
        """``state_dict`` of the full model with the evaluated (averaged) weights, on the CPU."""
        weights = {k: v.detach().cpu() for k, v in self.evaluated_state_dict().items()}
        if self.prep.trainable is self.prep.model:
            return weights
        return {f"classifier.{k}": v for k, v in weights.items()}


def _averaging(cfg: TrainConfig) -> str:
    if cfg.polyak is not None:
        return f"--polyak {cfg.polyak}"
    return f"--ema {cfg.ema:g}"


def run_epochs(trainer: Trainer, progress: bool, started: float) -> None:
    """Train the remaining epochs, saving the checkpoint and metrics after each.

    ``started`` is when this session started (``time.time()``); the recorded
    ``elapsed_s`` adds the time of earlier sessions of the run.

    ``KeyboardInterrupt`` propagates; the checkpoint on disk is then the
    last complete epoch's (files are replaced atomically). In a ``--nproc``
    run every rank trains, evaluates and saves the checkpoint (collective);
    rank 0 alone writes ``metrics.json``.
    """
    while trainer.epoch < trainer.cfg.epochs:
        stats = trainer.train_epoch(progress)
        trainer.epoch += 1
        elapsed = trainer.elapsed_before + time.time() - started
        trainer.record(stats, elapsed)
        trainer.save(elapsed)
        document = metrics_document(trainer, None)
        on_rank0(partial(rundir.write_metrics, trainer.run_dir, document), "write metrics.json")


def metrics_document(trainer: Trainer, final: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    cfg = trainer.cfg
    return {
        "dataset": cfg.dataset, "model": cfg.model, "private": not cfg.non_private,
        "eval_split": trainer.prep.eval_name, "metric": trainer.prep.task.metric,
        "higher_is_better": trainer.prep.task.higher_is_better, "target_epsilon": None if cfg.non_private
        else cfg.epsilon, "delta": None if cfg.non_private else cfg.delta,
        "epochs": trainer.history, "final": final,
        "note": PRIVACY_NOTE if not cfg.non_private else "non-private baseline: no guarantee",
    }


class _ViewsAsRows:
    """The baseline's model on ``(B, K, ...)`` views: run on ``(B·K, ...)``, output ``(B, K, ...)``.

    (Under DP the engine does this itself: :mod:`swiftdp.clipping.views`.)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x.flatten(0, 1))
        return out.unflatten(0, tuple(x.shape[:2]))
