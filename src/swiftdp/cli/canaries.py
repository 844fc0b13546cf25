"""``swiftdp train --audit-inputs M``: input-space canaries in the run itself.

The run's training set gets the included half of ``M`` crafted examples
(:class:`swiftdp.audit.InputCanaries`: uniform random pixels, random labels)
before the trainer is built, so the loader, the sampling rate and every step
see them as ordinary examples; after training, each canary is scored on the
evaluated model (what ``model.pt`` holds) and the black-box lower bound on ε
is reported beside the run's claim (``privacy.md``, ``privacy.json``,
``audit_inputs.png``).

The canaries' content and inclusion come from ``--seed`` (0 without one),
independent of the training's randomness, so a resumed run inserts the same
ones. They change the training data: a run with ``--audit-inputs`` is an
audit of the pipeline at this configuration, not the model to release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from swiftdp.audit.inputs import InputCanaries
from swiftdp.cli.setup import Prepared, featurize
from swiftdp.data import Split

if TYPE_CHECKING:
    from swiftdp.cli.train import Trainer

SEED_OFFSET = 0x5EED
"""Added to ``--seed`` for the canaries' generator (kept apart from the training's)."""


def insert(prep: Prepared, m: int, seed: int | None) -> tuple[InputCanaries, Tensor]:
    """Add the included canaries to ``prep.train``; the canaries and their model inputs.

    The model inputs are the canaries' frozen features when the run caches
    features (a ScatterNet model), else the canaries themselves.
    """
    raw = prep.data.train.x
    canaries = InputCanaries.random(m, like=raw, classes=prep.data.num_classes,
                                    seed=(seed or 0) + SEED_OFFSET)
    cx = canaries.x
    if prep.trainable is not prep.model:  # features cached: the head trains on features
        cx = featurize(prep.model.features, canaries.x, prep.device)  # type: ignore[arg-type]
    x, y = canaries.insert(prep.train.x, prep.train.y, cx)
    prep.train = Split(x, y)
    return canaries, cx


def audit_of(trainer: Trainer, canaries: InputCanaries, cx: Tensor) -> dict[str, Any]:
    """The input-canary audit of the run: scores on the evaluated model, the bounds."""
    from swiftdp.cli.audit import write

    trainer.eval_model.load_state_dict(trainer.evaluated_state_dict())
    dp = trainer.dp
    claimed = float("inf") if dp is None else float(trainer.epsilon())
    delta = trainer.cfg.delta
    result = canaries.audit(
        trainer.eval_model, epsilon_claimed=claimed, delta=delta, canary_x=cx,
        steps=trainer.steps,
        sample_rate=float("nan") if dp is None else float(dp.privacy.sample_rate),
        noise_multiplier=float("nan") if dp is None else float(dp.privacy.noise_multiplier))
    write(result, trainer.run_dir, name="audit_inputs")
    doc = {k: v for k, v in result.to_dict().items() if k not in ("in_scores", "out_scores")}
    doc["what"] = ("input-space canaries (random pixels, random labels) in this run's training "
                   "set, scored on the trained model by the log-probability of their label "
                   "(black-box; swiftdp.audit.InputCanaries)")
    return doc
