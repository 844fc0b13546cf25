"""Empirical privacy audit: can an observer tell whether a canary was trained on?

Runs one full DP-SGD step through the real pipeline (``make_private``:
sampling, clipping engine, noise, division by the expected batch size) on a
dataset ``D`` and on ``D ∪ {canary}``, many times, and looks at the update's
component along the canary's gradient. Any threshold test on it gives a
(1 - confidence) lower bound on ε via Clopper–Pearson intervals. A correct
implementation never shows a lower bound above the accountant's ε; a broken
one (unclipped gradients, noise too small, wrong scaling) does, given enough
trials.

References:
    Jagielski, Ullman, Oprea. Auditing differentially private machine
    learning: how private is private SGD? NeurIPS 2020.
    Nasr et al. Adversary instantiation: lower bounds for differentially
    private machine learning. IEEE S&P 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp.accounting import PrivacyAccountant


@dataclass(frozen=True)
class AuditResult:
    """Outcome of an audit.

    Attributes:
        epsilon_lower_bound: ε that the observed distinguishability proves
            (with the stated confidence).
        epsilon_theory: ε the accountant claims for the audited step.
        trials: runs per world.
    """

    epsilon_lower_bound: float
    epsilon_theory: float
    trials: int

    @property
    def violated(self) -> bool:
        """Whether the empirical bound exceeds the claimed ε (a privacy bug)."""
        return self.epsilon_lower_bound > self.epsilon_theory


def _one_step(x: torch.Tensor, sigma: float, clip: float, seed: int) -> float:
    from swiftdp.api.private import make_private

    model = nn.Linear(x.shape[1], 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ds = TensorDataset(x)
    dp = make_private(model, opt, DataLoader(ds, batch_size=len(ds)), noise_multiplier=sigma,
                      max_grad_norm=clip, seed=seed, delta=0.5 / len(ds), loss_reduction="sum")
    (batch,) = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    dp.model(batch).sum().backward()
    dp.optimizer.step()
    dp.detach()
    return float(-model.weight.detach()[0, 0]) * dp.privacy.expected_batch_size / clip


def epsilon_lower_bound(without: list[float], with_: list[float], delta: float,
                        confidence: float = 0.95) -> float:
    """Largest ε proved by a threshold test separating two samples of the statistic.

    Args:
        without: the statistic in runs without the canary.
        with_: the statistic in runs with the canary (expected larger).
        delta: the δ of the guarantee being audited.
        confidence: one-sided confidence of each Clopper–Pearson bound.

    Returns:
        ``max_τ log((1 - δ - FNR_hi(τ)) / FPR_hi(τ))`` over thresholds, 0 if none is positive.
    """
    n0, n1 = len(without), len(with_)
    alpha = 1 - confidence
    best = 0.0
    for tau in sorted(set(without) | set(with_)):
        fp = sum(v > tau for v in without)
        fn = sum(v <= tau for v in with_)
        fpr_hi = beta.ppf(1 - alpha, fp + 1, n0 - fp) if fp < n0 else 1.0
        fnr_hi = beta.ppf(1 - alpha, fn + 1, n1 - fn) if fn < n1 else 1.0
        num = 1 - delta - fnr_hi
        if num > 0 and fpr_hi > 0:
            best = max(best, math.log(num / fpr_hi))
    return best


def audit_gaussian_step(noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                        trials: int = 300, dim: int = 4, dataset_size: int = 8,
                        seed: int = 0) -> AuditResult:
    """Audit one full-batch DP-SGD step of the real pipeline with a gradient canary.

    Args:
        noise_multiplier: σ of the audited step.
        max_grad_norm: C.
        trials: runs per world (with and without the canary).
        dim: model width.
        dataset_size: examples besides the canary.
        seed: seed of the data and of every run.

    Returns:
        The empirical lower bound and the accountant's ε at δ = 1e-5.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dataset_size, dim, generator=g, dtype=torch.float64) * 0.1
    canary = torch.zeros(1, dim, dtype=torch.float64)
    canary[0, 0] = 100.0 * max_grad_norm  # far outside the clipping ball
    with_canary = torch.cat([base, canary])
    a = [_one_step(base, noise_multiplier, max_grad_norm, seed * 100003 + 2 * t) for t in range(trials)]
    b = [_one_step(with_canary, noise_multiplier, max_grad_norm, seed * 100003 + 2 * t + 1)
         for t in range(trials)]
    delta = 1e-5
    acct = PrivacyAccountant("pld")
    acct.step(noise_multiplier, 1.0, 1)
    return AuditResult(epsilon_lower_bound(a, b, delta), acct.epsilon(delta), trials)
