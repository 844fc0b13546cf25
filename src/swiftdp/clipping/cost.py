"""Per-layer, per-batch cost model: ghost norm or per-example instantiation.

For a layer whose per-example weight gradient is ``G_i = g_iᵀ a_i`` with
``a_i`` of shape ``(T, d)`` and ``g_i`` of shape ``(T, p)``:

* ghost norm: ``‖G_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩`` costs ``T²(d + p)`` per example
  and holds a ``T × T`` matrix;
* instantiation: ``G_i`` costs ``T p d`` per example and holds ``p × d``,
  and every pass over it (its norm, its share of the clipped sum) is memory
  traffic, charged :data:`INSTANTIATED_PASS_COST` multiply-adds per element.

With book-keeping the clipped sum ``(c ⊙ g)ᵀ a`` (``T p d``) is needed on the
ghost side, while the instantiated side reuses ``G_i`` (one more pass). The decision
is made on the shapes of the batch at hand, every batch.

The objective says what is minimised: ``"time"`` (arithmetic, the default),
``"memory"`` (what is held per example), or one side forced for every factored
layer, ``"ghost"`` or ``"instantiate"``, to measure each side on its own
(``swiftdp bench --sweep``). Every objective gives the same, exact clipped sum:
only speed and memory change. Embeddings have their own chooser and read the
forced objectives as ``"time"``.

References:
    Bu, Mao, Xu. Scalable and efficient training of large convolutional neural
    networks with differential privacy. NeurIPS 2022 (mixed ghost clipping).
    Bu et al. Differentially private optimization on large model at small cost.
    ICML 2023 (book-keeping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CostObjective = Literal["time", "memory", "ghost", "instantiate"]

INSTANTIATED_PASS_COST = 32
"""What ``"time"`` charges, in multiply-adds per element, for one pass over an
instantiated per-example gradient (writing it, reading it for the norm,
reading it for the clipped sum). The passes are memory traffic over
``B × p × d`` values, not arithmetic: timed on one CPU thread (``swiftdp bench
--sweep``, and layer by layer at ``B = 16``, ``T = 64…256``, ``d = 128…1024``)
an instantiated element cost 30–130 times a multiply-add of the ghost side's
Gram matrices, more for larger ``p d``. At 32 per pass (64 per element with
book-keeping) the choice matched the faster side at every layer shape timed;
with the pure arithmetic count (1 per pass) it instantiated transformer layers
at ``d >= 512``, ``T = 128`` that the ghost norm ran 1.5–3× faster."""

CONV_TIME_TIE = 0.15
"""How much more work (relative) a convolution's ghost side may count under
``"time"`` and still be taken. Inside the band it always holds less per
example (``T (d + p) <= 1.15 p d`` gives ``2T² <= 0.67 p d``), the count is a
model, and the instantiated gradients held to the end of the backward were
the step's memory excess: ResNet-18's 64→64 convs on 8×8 maps count 1.11×,
and ghost there timed within 3 % of instantiating (+2.6 % at 1 thread, −2 %
at 2, interleaved in one process) with the live peak 133 → 109 MB (see
BENCHMARKS.md, ``benchmarks/live_memory.py``). Linear layers keep the strict
comparison: ViT-tiny's projections at a 1.015× count ran 5 % slower as ghost."""


def factored_costs(
    seq_len: int, in_features: int, out_features: int, *, reuse_for_sum: bool = True,
    pass_cost: int = 1,
) -> tuple[int, int]:
    """Per-example cost of one factored layer's DP work: ghost side, instantiated side.

    Args:
        seq_len: ``T``, positions per example.
        in_features: ``d``.
        out_features: ``p``.
        reuse_for_sum: book-keeping (the clipped sum comes from the same
            representation as the norm); ``False`` counts the norm only.
        pass_cost: multiply-adds charged per element for each pass over the
            instantiated ``p × d`` gradient: 1 counts arithmetic only (a flop
            model); the ``"time"`` objective uses :data:`INSTANTIATED_PASS_COST`.

    Returns:
        ``(ghost, instantiate)``: ``T²(d + p)`` (+ ``T p d`` for the clipped
        sum) against ``T p d + c p d`` (+ ``c p d`` for the clipped sum), ``c``
        the ``pass_cost``. With book-keeping the ``T p d`` of either side
        replaces the weight gradient of the non-private backward, which the DP
        backward does not form.
    """
    t, d, p, c = seq_len, in_features, out_features, pass_cost
    ghost = t * t * (d + p)
    inst = t * p * d + c * p * d
    if reuse_for_sum:
        ghost += t * p * d
        inst += c * p * d
    return ghost, inst


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
        objective: ``"time"`` compares :func:`factored_costs` with each pass
            over an instantiated gradient charged :data:`INSTANTIATED_PASS_COST`
            per element; ``"memory"`` compares what is held per example
            (``2T²`` against ``p d``, the mixed-ghost rule); ``"ghost"`` and
            ``"instantiate"`` force that side.
        reuse_for_sum: whether the clipped sum is formed from the same
            representation (book-keeping); then the ghost side pays the
            ``T p d`` clipped-sum matmul and instantiation one more pass.

    Returns:
        ``True`` when the ghost norm should be used.
    """
    if objective == "ghost":
        return True
    if objective == "instantiate":
        return False
    t, d, p = seq_len, in_features, out_features
    if t <= 1:
        return True
    if objective == "memory":
        return 2 * t * t < p * d
    ghost, inst = factored_costs(t, d, p, reuse_for_sum=reuse_for_sum,
                                 pass_cost=INSTANTIATED_PASS_COST)
    return ghost < inst


@dataclass(frozen=True)
class ModePolicy:
    """The engine mode's choices, as the layer rules' ``build`` receives them.

    Implements :class:`swiftdp.clipping.contract.Policy`.

    Attributes:
        mode: ``"bk"``, ``"ghost"`` or ``"per_sample"``.
        cost_objective: what the cost models minimise: ``"time"``, ``"memory"``,
            or ``"ghost"`` / ``"instantiate"`` to force that side for every
            factored layer (linear, attention projections, recurrent, conv) in
            ``bk`` and ``ghost`` mode; ``per_sample`` always instantiates.
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
        So ghost wins whenever ``T (d + p) <= p d``, and is taken up to
        :data:`CONV_TIME_TIE` above that, where it holds less. A forced
        objective (``"ghost"``, ``"instantiate"``) skips the correction.
        """
        if self.factored(positions, d_in, d_out):
            return True
        if self.mode == "per_sample" or self.cost_objective != "time":
            return False
        return positions * (d_in + d_out) <= (1.0 + CONV_TIME_TIE) * d_out * d_in

    def conv_sum_from_factors(self, factor_elems: int, grad_elems: int) -> bool:
        """For a convolution that instantiates: whether to do so for its norms only.

        The per-example gradients are then freed as soon as the norms are
        formed, and the input and output gradient are kept instead, for a
        clipped sum by one native weight-gradient convolution (the ghost side's).
        Taken in ``bk`` mode when those hold at most half as much per example
        as a gradient does (many channels on small maps outside the ghost
        side's tie band, e.g. 32→32 3×3 on 8×8): the gradients held to the end
        of the backward are then the memory excess (``benchmarks/live_memory.py``).
        The arithmetic it adds, one weight-gradient convolution in place of
        ``w @ G``, is what the non-private step spends on the layer (3.1–3.7 ms
        against 0.25 for ResNet-18's 64→64 convs at B = 64, 1 thread). Not under
        a forced objective.

        Args:
            factor_elems: elements of one example's input and output gradient.
            grad_elems: elements of the weight.
        """
        return (self.mode == "bk" and not self.second_pass
                and self.cost_objective in ("time", "memory") and 2 * factor_elems <= grad_elems)
