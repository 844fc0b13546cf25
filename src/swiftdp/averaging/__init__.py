"""Averages of the trained parameters (EMA, Polyak) for evaluation and release.

Post-processing of the privately released parameters: no privacy cost.
:class:`ParameterAverage` holds the average; :mod:`swiftdp.averaging.schedule`
gives the weight of each update as plain numbers.
"""

from swiftdp.averaging.parameter_average import DEFAULT_DECAY, ParameterAverage
from swiftdp.averaging.schedule import ema_decay, update_weight

__all__ = ["DEFAULT_DECAY", "ParameterAverage", "ema_decay", "update_weight"]
