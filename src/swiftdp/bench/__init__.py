"""The benchmark suite behind ``swiftdp bench``.

Models (:mod:`~swiftdp.bench.models`) x methods (:mod:`~swiftdp.bench.methods`),
each measured in a fresh process (:mod:`~swiftdp.bench.worker`) against
non-private training of the same unmodified model, timed interleaved
(:mod:`~swiftdp.bench.timing`); :mod:`~swiftdp.bench.report` writes the table,
JSON and chart; :mod:`~swiftdp.bench.cli` is the command.
"""

from swiftdp.bench.methods import DEFAULT_METHODS, METHODS
from swiftdp.bench.models import SUITE, SuiteModel, get_model
from swiftdp.bench.runner import SuiteConfig, run_suite
from swiftdp.bench.worker import measure

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "SUITE",
    "SuiteConfig",
    "SuiteModel",
    "get_model",
    "measure",
    "run_suite",
]
