"""The audited pipeline: a lookup-table model trained through ``make_private``.

Shared by :func:`swiftdp.audit.one_run` and :func:`swiftdp.audit.many_runs`.
Example ``k`` is ``(row, norm, present)``: the model's output on it is
``norm · w[row]`` and the loss is that output summed, so its gradient is
``norm · e_row`` — a fixed direction of a fixed norm (a white-box gradient
canary), and the model is a lookup table, so a million canaries cost a
million parameters.

**The neighbours are add/remove with the run's public parameters fixed.** The
dataset holds a *slot* for every canary, present or not; the loader's
``batch_size`` (the expected batch ``B``, the divisor) and ``q = B / N`` are
computed from the slots, so they are the same whichever canaries are in, as
the accountant assumes (it is told one q and divides by one ``B``). An absent
canary's slot is dropped after sampling, in the collate function: the batch
the engine sees is exactly the Poisson sample of the dataset without it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp.errors import InvalidArgumentError


class Canaries(nn.Module):
    """A linear model on one-hot inputs, as a lookup: ``out_k = norm_k · w[row_k]``."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, 1, dtype=torch.float64)
        nn.init.zeros_(self.table.weight)

    def forward(self, row: Tensor, norm: Tensor) -> Tensor:
        return self.table(row)[:, 0] * norm


def collate_present(items: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The sampled examples that are in the dataset (absent canaries' slots dropped)."""
    kept = [(r, n) for r, n, p in items if bool(p)]
    if not kept:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    rows, norms = zip(*kept, strict=True)
    return torch.stack(rows), torch.stack(norms)


@dataclass(frozen=True)
class Trained:
    """What one audited run left: the table's weights and the run's claim."""

    weights: np.ndarray
    epsilon: float
    sample_rate: float
    expected_batch_size: float


def check_rates(*, sample_rate: float, confidence: float, slots: int) -> None:
    """Refuse a rate the audit would not run at, before any training.

    Raises:
        InvalidArgumentError: ``confidence`` not in (0, 1); ``sample_rate``
            not in (0, 1]; or ``sample_rate · slots`` not a whole batch (the
            audit would silently run at another q), naming the nearest q that is.
    """
    if not 0 < confidence < 1:
        raise InvalidArgumentError(
            f"confidence={confidence!r}: expected a number in (0, 1), e.g. 0.95.")
    if not 0 < sample_rate <= 1:
        raise InvalidArgumentError(
            f"sample_rate={sample_rate!r}: expected a Poisson rate q in (0, 1].")
    batch = sample_rate * slots
    if abs(batch - round(batch)) > 1e-9 * max(1.0, batch) or round(batch) < 1:
        k = min(slots, max(1, round(batch)))
        raise InvalidArgumentError(
            f"sample_rate={sample_rate!r} over {slots} slots is an expected batch of "
            f"{batch:g}, not a whole number: the audit would run at q = {k}/{slots} = "
            f"{k / slots:.6g}. Pass that sample_rate, or change the number of slots "
            "(fillers, canaries).")


def train(*, table_rows: int, rows: np.ndarray, norms: np.ndarray, present: np.ndarray,
          sample_rate: float, steps: int, noise_multiplier: float, max_grad_norm: float,
          delta: float, mode: str, accountant: str, max_physical_batch_size: int | None,
          seed: int | None, claim: bool = True) -> Trained:
    """Train the lookup table on the slots ``(rows, norms, present)`` for ``steps`` steps.

    ``seed=None`` draws the sampling and the noise from OS entropy (``secure``);
    ``claim=False`` skips the accountant's ε (NaN: runs of one configuration
    share it, and computing it costs more than a small run).
    """
    from swiftdp.api.private import make_private

    data = TensorDataset(torch.as_tensor(rows), torch.as_tensor(norms, dtype=torch.float64),
                         torch.as_tensor(present))
    batch = max(1, round(sample_rate * len(data)))
    model = Canaries(table_rows)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(data, batch_size=batch, collate_fn=collate_present)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = make_private(
            model, opt, loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            steps=steps, delta=delta, loss_reduction="sum", mode=mode, accountant=accountant,
            max_physical_batch_size=max_physical_batch_size, seed=seed, secure=seed is None,
            check_independence=False)
    taken = 0
    while taken < steps:
        batches: Any = dp.data_loader
        for idx, scale in batches:
            dp.optimizer.zero_grad()
            if len(idx):
                dp.model(idx, scale).sum().backward()
            before = dp.steps
            dp.optimizer.step()
            if dp.steps > before:
                taken += 1
            if taken >= steps:
                break
    claimed = float(dp.epsilon(delta)) if claim else math.nan
    out = Trained(model.table.weight.detach()[:, 0].numpy().copy(), claimed,
                  float(dp.privacy.sample_rate), float(dp.privacy.expected_batch_size))
    dp.detach()
    return out
