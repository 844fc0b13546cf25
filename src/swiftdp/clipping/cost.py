"""Per-layer, per-batch cost model: ghost norm or per-example instantiation.

For a layer whose per-example weight gradient is ``G_i = g_iᵀ a_i`` with
``a_i`` of shape ``(T, d)`` and ``g_i`` of shape ``(T, p)``:

* ghost norm: ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩`` costs ``T²(d + p)`` per example
  and holds a ``T × T`` matrix;
* instantiation: ``G_i`` costs ``T p d`` per example and holds ``p × d``.

With book-keeping the clipped sum ``(c ⊙ g)ᵀ a`` (``T p d``) is needed on the
ghost side, while the instantiated side reuses ``G_i`` (``p d``). The decision
is made on the shapes of the batch at hand, every batch.

References:
    Bu, Mao, Xu. Scalable and efficient training of large convolutional neural
    networks with differential privacy. NeurIPS 2022 (mixed ghost clipping).
    Bu et al. Differentially private optimization on large model at small cost.
    ICML 2023 (book-keeping).
"""

from __future__ import annotations

from typing import Literal

CostObjective = Literal["time", "memory"]


def prefer_ghost(
    seq_len: int,
    in_features: int,
    out_features: int,
    objective: CostObjective = "time",
    *,
    reuse_for_sum: bool = True,
) -> bool:
    """Say whether the ghost norm is cheaper than instantiation for one layer.

    Args:
        seq_len: ``T``, positions per example (1 for a plain Linear).
        in_features: ``d``, input width per group.
        out_features: ``p``, output width per group.
        objective: ``"time"`` compares arithmetic, ``"memory"`` compares what is
            held per example (``2T²`` against ``p d``, the mixed-ghost rule).
        reuse_for_sum: whether the clipped sum is formed from the same
            representation (book-keeping); then the ghost side pays the
            ``T p d`` clipped-sum matmul and instantiation pays only ``p d``.

    Returns:
        ``True`` when the ghost norm should be used.
    """
    t, d, p = seq_len, in_features, out_features
    if t <= 1:
        return True
    if objective == "memory":
        return 2 * t * t < p * d
    ghost = t * t * (d + p)
    inst = t * p * d + p * d
    if reuse_for_sum:
        ghost += t * p * d
        inst += p * d
    return ghost < inst
