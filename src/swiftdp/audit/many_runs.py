"""Auditing across many independent runs, one canary each: for leaks of a count.

A one-run audit (:func:`swiftdp.audit.one_run`) guesses each canary's
membership from its own score, so it sees a leak only where the leak can be
attributed to one canary. Some bugs leak a *count* over all examples — the
noised sum divided by the realised batch size instead of the fixed ``B``
reveals the realised size in the update's scale — which no per-canary guess
in one run can pin on a canary. :func:`many_runs` trains ``runs`` independent
times through the same pipeline (:mod:`swiftdp.audit.pipeline`), each run
with one canary included with probability ½, a few fillers and ``spare``
parameters that no example touches, and guesses each run's canary from that
run's final model. The guesses are independent, so the bounds of
:mod:`swiftdp.audit.bounds` hold for them as for one run's canaries.

Scores (chosen before training, as the bounds require):

* ``"direction"`` — the model's movement along the canary's direction, in
  units of ``C / B`` (what :func:`one_run` scores);
* ``"scale"`` — minus the log of the spread of the spare parameters: pure
  noise divided by the divisor, so it reads the divisor. A correct pipeline
  divides by the fixed ``B`` in both worlds and the score carries nothing;
  one that divides by the realised batch shows the canary in the count. It
  reads the count best at q = 1 and one step (the default): at q = 0.5 with
  3 fillers and 4 steps the review measured the realised-batch fault at 0.19
  against 2.52 claimed, not caught.
"""

from __future__ import annotations

import math

import numpy as np

from swiftdp.audit import pipeline
from swiftdp.audit.one_run import OneRunAudit, audit_of_scores
from swiftdp.errors import InvalidArgumentError

__all__ = ["SCORES", "many_runs"]

SCORES = ("direction", "scale")


def many_runs(*, runs: int = 200, fillers: int = 1, spare: int = 1000, steps: int = 1,
              sample_rate: float = 1.0, noise_multiplier: float = 2.0,
              max_grad_norm: float = 1.0, delta: float = 1e-5, confidence: float = 0.95,
              mode: str = "bk", max_physical_batch_size: int | None = None,
              accountant: str = "pld", canary_norm: float = 10.0, score: str = "scale",
              seed: int | None = None) -> OneRunAudit:
    """Audit ``runs`` independent training runs of the real pipeline, one canary each.

    Args:
        runs: independent runs (the bound's guesses); at least 10.
        fillers: ordinary examples in every run (norm ``2C``, each its own direction).
        spare: parameters no example touches (what ``score="scale"`` reads).
        steps: logical steps per run.
        sample_rate: q (the divisor is ``B = q·(1 + fillers)``: the canary's
            slot counts whether it is in or not).
        noise_multiplier: σ.
        max_grad_norm: C.
        delta: δ of the claim and of the bounds.
        confidence: of the bounds (95% by default).
        mode: the clipping engine's mode.
        max_physical_batch_size: physical chunks, as ``make_private`` takes them.
        accountant: the accountant whose ε is the claim.
        canary_norm: the canary's gradient norm, in units of ``C``.
        score: ``"scale"`` (default) or ``"direction"`` (module docstring).
        seed: seeds inclusion, sampling and noise (``None``: fresh OS entropy).

    Returns:
        The :class:`~swiftdp.audit.OneRunAudit` of the runs' guesses
        (``canaries`` = ``runs``, ``runs`` set).

    Raises:
        InvalidArgumentError: a count, rate or score out of range.
    """
    if runs < 10 or fillers < 0 or spare < 0 or steps < 1 or not canary_norm >= 1:
        raise InvalidArgumentError(
            f"Expected runs >= 10, fillers >= 0, spare >= 0, steps >= 1, canary_norm >= 1; "
            f"got {runs}, {fillers}, {spare}, {steps}, {canary_norm}.")
    if score not in SCORES:
        raise InvalidArgumentError(f"score={score!r}: expected one of {', '.join(SCORES)}.")
    if score == "scale" and spare < 2:
        raise InvalidArgumentError(
            f"score='scale' reads the spread of the spare parameters; got spare={spare}, "
            "expected at least 2 (1000 by default).")
    pipeline.check_rates(sample_rate=sample_rate, confidence=confidence, slots=1 + fillers)
    rng = np.random.default_rng(seed)
    included = rng.random(runs) < 0.5
    # Slots: the fillers first (the loader's template batch is a present example), the
    # canary last; table rows: canary 0, fillers 1..F, then the spare rows.
    rows = np.concatenate([1 + np.arange(fillers), [0]])
    norms = np.concatenate([np.full(fillers, 2.0 * max_grad_norm), [canary_norm * max_grad_norm]])
    scores = np.empty(runs)
    claimed = sample_rate_used = 0.0
    for r in range(runs):
        present = np.concatenate([np.ones(fillers, dtype=bool), included[r:r + 1]])
        run = pipeline.train(
            table_rows=1 + fillers + spare, rows=rows, norms=norms, present=present,
            sample_rate=sample_rate, steps=steps, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, delta=delta, mode=mode, accountant=accountant,
            max_physical_batch_size=max_physical_batch_size,
            seed=None if seed is None else int(rng.integers(2**31)), claim=r == 0)
        if r == 0:
            claimed, sample_rate_used = run.epsilon, run.sample_rate
        if score == "direction":
            scores[r] = -run.weights[0] * run.expected_batch_size / max_grad_norm
        else:
            noise = run.weights[1 + fillers:]
            scores[r] = -0.5 * math.log(max(float(np.mean(noise * noise)), 1e-300))
    return audit_of_scores(scores, included, epsilon_claimed=claimed, delta=delta,
                           confidence=confidence, steps=steps, sample_rate=sample_rate_used,
                           noise_multiplier=noise_multiplier, runs=runs, score=score)
