"""Poisson sampling split across data-parallel ranks (``PoissonBatchSampler(rank=, world_size=)``).

The ranks' batches are disjoint and their union is, batch for batch, what one
process draws from the same seed: the global sample is Poisson with rate q
over the whole dataset, whatever the number of ranks.
"""

from __future__ import annotations

import pytest

from swiftdp.errors import InvalidArgumentError
from swiftdp.sampling import PoissonBatchSampler


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_split_the_one_process_sample(world):
    n, q, steps = 101, 0.2, 7
    single = list(PoissonBatchSampler(n, q, steps, seed=3))
    ranks = [list(PoissonBatchSampler(n, q, steps, seed=3, rank=r, world_size=world))
             for r in range(world)]
    for t in range(steps):
        parts = [ranks[r][t] for r in range(world)]
        union = sorted(i for p in parts for i in p)
        assert union == single[t]
        assert len(union) == len(set(union))  # disjoint
        assert all(i % world == r for r, p in enumerate(parts) for i in p)


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(InvalidArgumentError, match="rank"):
        PoissonBatchSampler(10, 0.5, 2, seed=0, rank=2, world_size=2)
