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

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModePolicy:
    """The engine mode's choices, as the layer rules' ``build`` receives them.

    Implements :class:`swiftdp.clipping.contract.Policy`.

    Attributes:
        mode: ``"bk"``, ``"ghost"`` or ``"per_sample"``.
        cost_objective: what the cost models minimise.
        second_pass: ghost clipping's second backward (only weighted sums are
            formed there, always from factors).
    """

    mode: str
    cost_objective: str = "time"
    second_pass: bool = False

    @property
    def allow_pairs(self) -> bool:
        """Whether an embedding may use the token-pair ghost method."""
        return self.mode != "per_sample"

    def factored(self, seq_len: int, d_in: int, d_out: int) -> bool:
        """Ghost norm (``True``) or instantiation for a factored layer of these shapes."""
        if self.second_pass:
            return True
        if self.mode == "per_sample":
            return False
        return prefer_ghost(seq_len, d_in, d_out, self.cost_objective,  # type: ignore[arg-type]
                            reuse_for_sum=self.mode != "ghost")

    def factored_conv(self, positions: int, d_in: int, d_out: int) -> bool:
        """The choice for a convolution, with its conv-specific time correction.

        Instantiating a conv's per-example gradients costs about twice the
        ``T p d`` arithmetic of the generic model (im2col plus many small
        matmuls, measured on CPU for ResNet-18's 8×8 and 4×4 stages), while the
        ghost side's clipped sum is one efficient native weight-gradient kernel.
        So ghost wins whenever ``T (d + p) <= p d``.
        """
        if self.factored(positions, d_in, d_out):
            return True
        if self.mode == "per_sample" or self.cost_objective != "time":
            return False
        return positions * (d_in + d_out) <= d_out * d_in
