"""One-run privacy auditing of the real DP-SGD pipeline (Steinke, Nasr, Jagielski 2023).

:func:`one_run` trains once, through :func:`swiftdp.make_private` as a user
would (Poisson sampling at the run's q, the clipping engine, the noise, the
division by ``q·N``, many steps), on a dataset holding ``m`` canaries, each
included independently with probability ½, and filler examples. Each canary
is a crafted example whose gradient is a fixed direction of norm above ``C``
(white-box gradient canaries: a linear model on one-hot inputs trained on
the linear loss ``⟨w, x⟩``, canary ``i`` the input ``10C·e_i``, so its
clipped gradient is ``C·e_i`` at every step it is sampled; the model is a
lookup table, so a million canaries cost a million parameters:
:mod:`swiftdp.audit.pipeline`); its score after training is the model's
movement along its direction. An excluded canary keeps its slot in the
dataset and is dropped after sampling, so q and the divisor ``q·N`` are the
run's public parameters in both worlds (add/remove neighbours, as accounted). The auditor guesses "included" for the
highest scores; the number of right guesses gives a lower bound on ε at the
chosen confidence (:mod:`swiftdp.audit.bounds`, the (ε, δ) bound and its
f-DP refinement), reported beside the accountant's ε for the same run.

A correct pipeline stays at or below the accountant's ε (the bound is a
proof, up to the confidence); a broken one shows a bound above it where the
audit has the power to see it — the bound's ceiling for ``m`` canaries (all
guesses right) must clear the claimed ε. :mod:`swiftdp.audit.faults` has the
known bugs to check that power on any configuration.

References:
    Steinke, Nasr, Jagielski. Privacy auditing with one (1) training run.
    NeurIPS 2023. Mahloujifar, Melis, Chaudhuri. Auditing f-differential
    privacy in one run. 2025.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from swiftdp.audit import pipeline
from swiftdp.audit.bounds import best_guesses
from swiftdp.errors import InvalidArgumentError

__all__ = ["OneRunAudit", "one_run"]


@dataclass(frozen=True)
class OneRunAudit:
    """What one audited training run showed.

    Attributes:
        epsilon_claimed: the accountant's ε for the run, at ``delta``.
        epsilon_lower_bound: the (ε, δ) bound of Steinke et al. (best guess count).
        epsilon_lower_bound_fdp: the f-DP bound of Mahloujifar et al.
        ceiling_fdp: the largest f-DP bound these ``m`` canaries could show
            (every guess right): an audit cannot see a bug whose ε is above it.
        canaries: ``m``.
        included: canaries that were in the training set.
        guesses: guesses of the best count (f-DP).
        correct: its right guesses.
        confidence: of the bounds.
        delta: δ of the claim and the bounds.
        steps: logical steps trained.
        sample_rate: q.
        noise_multiplier: σ.
        in_scores: scores of the included canaries.
        out_scores: scores of the excluded ones.
        runs: independent training runs the guesses come from (1: one run;
            :func:`swiftdp.audit.many_runs`: one canary per run).
        score: what was scored (``"direction"``: the movement along each
            canary's direction; ``"scale"``: the update's spread).
    """

    epsilon_claimed: float
    epsilon_lower_bound: float
    epsilon_lower_bound_fdp: float
    ceiling_fdp: float
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    in_scores: tuple[float, ...]
    out_scores: tuple[float, ...]
    runs: int = 1
    score: str = "direction"

    @property
    def violated(self) -> bool:
        """Whether either bound exceeds the claimed ε (a privacy bug, at the confidence)."""
        return max(self.epsilon_lower_bound, self.epsilon_lower_bound_fdp) > self.epsilon_claimed

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for JSON), scores included."""
        d = asdict(self)
        d["violated"] = self.violated
        return d


def one_run(*, canaries: int = 1000, fillers: int = 1000, steps: int = 10,
            sample_rate: float = 0.5, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
            delta: float = 1e-5, confidence: float = 0.95, mode: str = "bk",
            max_physical_batch_size: int | None = None, accountant: str = "pld",
            canary_norm: float = 10.0, seed: int | None = None) -> OneRunAudit:
    """Audit one training run of the real pipeline with ``canaries`` gradient canaries.

    Args:
        canaries: ``m``, each included with probability ½.
        fillers: ordinary examples always in the dataset (each its own
            direction, norm ``2C``: clipped too).
        steps: logical steps (one Poisson batch each).
        sample_rate: q (the expected batch, the divisor, is ``B = q·N``, N the
            slots: fillers and canaries, present or not, so q and B are the same
            whichever canaries are in, as the accountant assumes).
        noise_multiplier: σ.
        max_grad_norm: C.
        delta: δ of the claim and of the bounds.
        confidence: of the bounds (95% by default).
        mode: the clipping engine's mode.
        max_physical_batch_size: physical chunks, as ``make_private`` takes them.
        accountant: the accountant whose ε is the claim.
        canary_norm: each canary's gradient norm, in units of ``C`` (clipped to
            ``C`` when clipping works; a larger norm shows unclipped gradients).
        seed: seeds inclusion, sampling and noise (``None``: fresh OS entropy).

    Returns:
        The :class:`OneRunAudit`.

    Raises:
        InvalidArgumentError: a count or rate out of range.
    """
    if canaries < 10 or fillers < 0 or steps < 1 or not canary_norm >= 1:
        raise InvalidArgumentError(
            f"Expected canaries >= 10, fillers >= 0, steps >= 1, canary_norm >= 1; got "
            f"{canaries}, {fillers}, {steps}, {canary_norm}.")
    pipeline.check_rates(sample_rate=sample_rate, confidence=confidence,
                         slots=canaries + fillers)
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    # One slot per filler (first: the loader's template batch is a present example), then
    # one per canary, present or not (pipeline.py: q and the divisor fixed across worlds).
    rows = np.concatenate([canaries + np.arange(fillers), np.arange(canaries)])
    norms = np.concatenate([np.full(fillers, 2.0 * max_grad_norm),
                            np.full(canaries, canary_norm * max_grad_norm)])
    present = np.concatenate([np.ones(fillers, dtype=bool), included])
    run = pipeline.train(
        table_rows=canaries + fillers, rows=rows, norms=norms, present=present,
        sample_rate=sample_rate, steps=steps, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, delta=delta, mode=mode, accountant=accountant,
        max_physical_batch_size=max_physical_batch_size,
        seed=None if seed is None else int(rng.integers(2**31)))
    claimed = run.epsilon
    # Canary i's score: the model's movement along e_i, in units of C / B.
    scores = -run.weights[:canaries] * run.expected_batch_size / max_grad_norm
    return audit_of_scores(scores, included, epsilon_claimed=claimed, delta=delta,
                           confidence=confidence, steps=steps, sample_rate=run.sample_rate,
                           noise_multiplier=noise_multiplier)


def audit_of_scores(scores: np.ndarray, included: np.ndarray, *, epsilon_claimed: float,
                    delta: float, confidence: float, steps: int, sample_rate: float,
                    noise_multiplier: float, runs: int = 1,
                    score: str = "direction") -> OneRunAudit:
    """The bounds, their ceiling and the :class:`OneRunAudit` of canaries' scores.

    Args:
        scores: one per canary, higher for "more likely included" (fixed
            before the inclusion is looked at, as the bounds require).
        included: which canaries were in the training set.
        epsilon_claimed: the accountant's ε for the run (``inf``: no claim).
        delta: δ of the claim and of the bounds.
        confidence: of the bounds.
        steps: logical steps trained.
        sample_rate: q.
        noise_multiplier: σ.
        runs: independent runs the scores come from.
        score: what was scored.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    eps, _, _ = best_guesses(scores, included, confidence=confidence, delta=delta, fdp=False)
    eps_f, k, v = best_guesses(scores, included, confidence=confidence, delta=delta, fdp=True)
    perfect = included.astype(np.float64)  # every guess right: the most this audit can show
    ceiling, _, _ = best_guesses(perfect, included, confidence=confidence, delta=delta, fdp=True)
    return OneRunAudit(
        epsilon_claimed=float(epsilon_claimed), epsilon_lower_bound=eps,
        epsilon_lower_bound_fdp=eps_f,
        ceiling_fdp=ceiling if math.isfinite(ceiling) else float("inf"),
        canaries=len(scores), included=int(included.sum()), guesses=k, correct=v,
        confidence=confidence, delta=delta, steps=steps, sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier),
        in_scores=tuple(float(s) for s in scores[included]),
        out_scores=tuple(float(s) for s in scores[~included]), runs=runs, score=score)
