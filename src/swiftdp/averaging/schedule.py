"""How much of the new parameters each update of a parameter average takes: plain numbers.

Both averages are one rule, ``average ← average + w_t · (θ − average)``, with
``t`` the 0-based index of the averaged update (``t = n − start_step − 1``
at the ``n``-th call of :meth:`~swiftdp.averaging.ParameterAverage.update`;
before ``t = 0`` the average is a copy of the parameters, ``w = 1``):

* EMA: ``w_t = 1 − μ_t``, with ``μ_t = min(decay, (1 + t) / (10 + t))`` with
  warmup (De et al. 2022; the schedule of TensorFlow's
  ``ExponentialMovingAverage(num_updates=t)``) or ``μ_t = decay`` without.
* Polyak: ``w_t = 1 / (t + 1)``, the running mean of the parameters after
  steps ``start_step + 1, …, n``.

References:
    De, Berrada, Hayes, Smith, Balle. Unlocking high-accuracy differentially
    private image classification through scale. arXiv:2204.13650, 2022.

    Polyak, Juditsky. Acceleration of stochastic approximation by averaging.
    SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

__all__ = ["ema_decay", "update_weight"]


def ema_decay(t: int, decay: float, *, warmup: bool = True) -> float:
    """The EMA decay μ_t of the ``t``-th averaged update (``t = 0`` first).

    With warmup, ``μ_t = min(decay, (1 + t) / (10 + t))``: 0.1 at the first
    update, 0.5 at ``t = 8``, 0.9 at ``t = 80``, then ``decay``, so early
    averages are not dominated by the weights averaging started from.

    Args:
        t: index of the averaged update, ``>= 0``.
        decay: the largest decay, in ``[0, 1)``.
        warmup: whether to ramp the decay up as above.

    Returns:
        μ_t: the average keeps ``μ_t`` of itself and takes ``1 − μ_t`` of the
        new parameters.

    Example:
        >>> ema_decay(0, 0.999), ema_decay(8, 0.999), ema_decay(0, 0.999, warmup=False)
        (0.1, 0.5, 0.999)
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + t) / (10.0 + t))


def update_weight(n: int, *, start_step: int, decay: float | None,
                  warmup: bool = True) -> float:
    """The weight ``w`` of the new parameters at the ``n``-th update (``n >= 1``).

    Args:
        n: how many updates have been made, this one included.
        start_step: updates ``1, …, start_step`` only copy the parameters.
        decay: the EMA's decay; ``None`` for the Polyak running mean.
        warmup: whether the EMA's decay ramps up (:func:`ema_decay`).

    Returns:
        ``w`` in ``(0, 1]``: ``average ← average + w · (θ − average)``; 1 is a copy.

    Example:
        >>> [update_weight(n, start_step=2, decay=None) for n in (1, 2, 3, 4, 5)]
        [1.0, 1.0, 1.0, 0.5, 0.3333333333333333]
    """
    t = n - start_step - 1
    if t < 0:
        return 1.0
    if decay is None:
        return 1.0 / (t + 1)
    return 1.0 - ema_decay(t, decay, warmup=warmup)
