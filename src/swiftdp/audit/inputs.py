"""Input-space canaries: a black-box audit of the real model trained in the user's own loop.

:func:`swiftdp.audit.one_run` audits the mechanism with white-box gradient
canaries on a model built for it. :class:`InputCanaries` audits the model
you actually train: ``m`` crafted examples (by default images of uniform
random pixels, each with a random label — far from the data, so a model that
memorises shows it), each included in the training set independently with
probability ½; after training, each canary is scored on the trained model
by the log-probability it gives the canary's label, and the guesses of
membership become the same lower bound on ε (:mod:`swiftdp.audit.bounds`)::

    canaries = swiftdp.audit.InputCanaries.random(1000, like=train_x, classes=10, seed=0)
    x, y = canaries.insert(train_x, train_y)        # train on these, as usual
    ...                                              # make_private, the loop, any steps
    result = canaries.audit(model, epsilon_claimed=dp.epsilon(1e-5), delta=1e-5)

The model only ever sees the canaries as training examples, so the bound
holds for whatever the loop does (Steinke, Nasr, Jagielski 2023, black-box
setting). It is weak by nature — only the final model is looked at, and a
DP model barely moves on one example: expect a bound near 0 for a private
run; a run without clipping or noise (``--non-private``) shows the audit's
power.

The canaries' content and inclusion are drawn from ``seed``, independent of
the training's own randomness; they need not be secret.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from swiftdp.audit.one_run import OneRunAudit, audit_of_scores
from swiftdp.errors import InvalidArgumentError

__all__ = ["InputCanaries"]


@dataclass(frozen=True)
class InputCanaries:
    """``m`` crafted training examples, each included with probability ½.

    Attributes:
        x: the canaries' inputs, ``(m, *input shape)``.
        y: their labels, ``(m,)``.
        included: which of them go into the training set (``(m,)`` bool).
    """

    x: Tensor
    y: Tensor
    included: np.ndarray

    @classmethod
    def random(cls, m: int, *, like: Tensor, classes: int, seed: int = 0) -> InputCanaries:
        """Uniform random inputs in the range of ``like``, uniform random labels.

        Args:
            m: the number of canaries (at least 10).
            like: training inputs: the canaries take their shape, dtype and value range.
            classes: labels are drawn from ``0 .. classes - 1``.
            seed: seeds content and inclusion.

        Raises:
            InvalidArgumentError: ``m < 10``, ``classes < 2`` or an empty ``like``.
        """
        if m < 10 or classes < 2 or like.dim() < 1 or len(like) == 0:
            raise InvalidArgumentError(
                f"Expected m >= 10 canaries, classes >= 2 and non-empty training inputs; got "
                f"m={m}, classes={classes}, like of shape {tuple(like.shape)}.")
        g = torch.Generator().manual_seed(int(seed))
        lo, hi = float(like.min()), float(like.max())
        x = (lo + (hi - lo) * torch.rand((m, *like.shape[1:]), generator=g,
                                         dtype=torch.float64)).to(like.dtype)
        y = torch.randint(0, classes, (m,), generator=g)
        included = torch.rand(m, generator=g, dtype=torch.float64).numpy() < 0.5
        return cls(x, y, included)

    def __len__(self) -> int:
        return len(self.x)

    def insert(self, x: Tensor, y: Tensor, canary_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The training set with the included canaries appended.

        Args:
            x: training inputs.
            y: training labels.
            canary_x: the canaries as the trained model takes them, if not
                :attr:`x` (e.g. through frozen features computed once).
        """
        cx = self.x if canary_x is None else canary_x
        keep = torch.as_tensor(self.included)
        return (torch.cat([x, cx[keep].to(x.dtype)]),
                torch.cat([y, self.y[keep].to(y.dtype)]))

    @torch.no_grad()
    def scores(self, model: nn.Module, canary_x: Tensor | None = None,
               chunk: int = 500) -> np.ndarray:
        """Each canary's score: the log-probability the model gives its label.

        The model is called in evaluation mode (its mode is restored after).
        """
        cx = self.x if canary_x is None else canary_x
        was = model.training
        model.eval()
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            out = []
            for i in range(0, len(cx), chunk):
                logits = model(cx[i: i + chunk].to(device)).double()
                logp = torch.log_softmax(logits, dim=-1)
                out.append(logp.gather(1, self.y[i: i + chunk, None].to(device))[:, 0].cpu())
        finally:
            model.train(was)
        return torch.cat(out).numpy()

    def audit(self, model: nn.Module, *, epsilon_claimed: float, delta: float = 1e-5,
              confidence: float = 0.95, canary_x: Tensor | None = None, steps: int = 0,
              sample_rate: float = float("nan"),
              noise_multiplier: float = float("nan")) -> OneRunAudit:
        """Score the canaries on the trained ``model`` and bound ε from the guesses.

        Args:
            model: the trained model (the one released).
            epsilon_claimed: the accountant's ε for the run (``inf`` for no claim).
            delta: δ of the claim and of the bounds.
            confidence: of the bounds.
            canary_x: the canaries as the model takes them, if not :attr:`x`.
            steps: logical steps trained (reported only).
            sample_rate: q (reported only).
            noise_multiplier: σ (reported only).
        """
        if not 0 < confidence < 1:
            raise InvalidArgumentError(
                f"confidence={confidence!r}: expected a number in (0, 1), e.g. 0.95.")
        return audit_of_scores(self.scores(model, canary_x), self.included,
                               epsilon_claimed=epsilon_claimed, delta=delta,
                               confidence=confidence, steps=steps, sample_rate=sample_rate,
                               noise_multiplier=noise_multiplier, score="input")
