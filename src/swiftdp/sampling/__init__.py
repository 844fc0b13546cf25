"""Sampling: Poisson batches for the privacy accountant, physical chunks for memory.

Privacy guarantee. :func:`poisson_data_loader` and :class:`PoissonBatchSampler`
include every example independently with probability ``sample_rate`` at every
step, the scheme the accountant analyses; physical splitting changes memory
use only.
"""

from swiftdp.sampling.loader import (
    EmptyBatchCollate,
    PoissonDataLoader,
    poisson_data_loader,
    zero_rows,
)
from swiftdp.sampling.physical import (
    LogicalBatch,
    PhysicalBatchSplitter,
    batch_size_of,
    split_physical,
)
from swiftdp.sampling.poisson import PoissonBatchSampler, make_generator, steps_per_epoch

__all__ = [
    "EmptyBatchCollate",
    "LogicalBatch",
    "PhysicalBatchSplitter",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "batch_size_of",
    "make_generator",
    "poisson_data_loader",
    "split_physical",
    "steps_per_epoch",
    "zero_rows",
]
