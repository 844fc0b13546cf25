"""Per-device clipping for a model split into pipeline stages, one stage per process.

Each process of a ``torch.distributed`` group holds one stage of the model
(stage 0 reads the inputs, the last one computes the loss). swiftdp passes
the activations forward and their gradients back itself
(:class:`~swiftdp.pipeline.link.StageLink`, ``torch.distributed``
point-to-point). With ``make_private(stage_model, ..., pipeline_stage=k,
max_grad_norm=[C_0, C_1, ...])`` — the same list on every stage — stage ``k``
clips each example's gradient of *its own* parameters to ``C_k``, with that
example's norm over its own parameters only: no per-example norm crosses
processes (He et al. 2022, per-device clipping). Example (two stages):

    >>> dp = swiftdp.make_private(stage, opt, loader, max_grad_norm=[1.0, 1.0],
    ...                           pipeline_stage=k, noise_multiplier=1.0,
    ...                           steps=100)                       # doctest: +SKIP
    >>> for x, y in dp.data_loader:   # the same batches on every stage  # doctest: +SKIP
    ...     dp.optimizer.zero_grad()
    ...     if k == 0:
    ...         dp.send_activations(dp.model(x))
    ...         dp.stage_backward()     # the next stage's gradient of them
    ...     else:
    ...         out = dp.model(dp.receive_activations())
    ...         F.cross_entropy(out, y).backward()   # their gradient goes back
    ...     dp.optimizer.step()

A middle stage does both: ``dp.send_activations(dp.model(dp.receive_activations()))``
then ``dp.stage_backward()``. Skip the exchange on an empty batch (it is empty
on every stage alike) but still call ``optimizer.step()``.

The mechanism, and why it is private:

* **One sample.** Every stage draws the same Poisson sample (one sampling
  seed, shared from rank 0; secret with ``secure=True``), not split by rank
  as in data parallelism: example ``i`` of a batch is row ``i`` on every
  stage. Every ``step()`` compares a digest of each stage's sampler state
  after the batch, so a sampler changed on one stage is refused.
* **Per-example rows across the boundary.** The gradient a stage receives
  is ``∂L/∂h`` of the next stage's loss, computed by autograd through the
  next stage's model only: the model reads a fresh leaf in place of the
  received tensor, so nothing the loop adds can reach it, and the gradient
  leaves only after the engine has accepted that backward. The next stage's
  engine refuses modules that mix examples (BatchNorm, batch statistics,
  cross-row operations: its tracer and independence probe) and its loss check
  refuses losses that couple examples, so row ``i`` of ``∂L/∂h`` depends on
  example ``i`` and the public parameters only, and so does every
  per-example gradient the receiving stage forms from it. Stage ``k``'s
  clipped sum therefore changes by at most ``C_k`` when one example is added
  or removed, and the whole model's by at most ``S = √Σ_k C_k²``.
* **A stage without a loss** (every stage before the last) has no loss to
  check (``check_loss`` is off there); its only backward is
  ``dp.stage_backward()``, from the very output of its one forward that it
  sent (not a function of it, not changed in place, not replaced by a later
  hook). A backward anywhere else (a loss of an inner activation), a second
  forward before it, or a hook that changes the gradient reaching the output
  is refused. Its engine scales the captured gradients by the same
  ``loss_reduction`` as the last stage (``"mean"``: the gradient carries the
  loss's ``1/B``, ``B`` the same on every stage since the batch is), which
  every stage must declare alike.
* **Noise.** Each stage adds ``N(0, σ²S²)`` to every coordinate of its own
  clipped sum, from its own generator (seeded ``seed + 1 + 7919·rank``, or
  OS entropy), and divides by ``q·N``; nothing is all-reduced. The stages
  together release the whole model's clipped sum plus ``N(0, σ²S² I)``: one
  Gaussian mechanism with noise multiplier ``σ``, so every stage's
  accountant records the same ``(σ, q)`` steps and reports the same ε, that
  of the whole model. Every ``step()`` refuses two stages whose noise
  generators are in the same state (an optimizer state copied between stages).
* **Checked.** ``make_private`` refuses stages that disagree on the dataset
  (size, fingerprint), ``q``, ``q·N``, the list ``[C_0, ...]``, σ, the target
  ε, δ, the planned steps, ``secure``, seeding, the accountant, the clipping
  style, ``loss_reduction`` or physical batching; stage indices that are not
  ``0 .. W-1`` once each (``W`` = ranks = stages); and ``mode="ghost"`` or
  ``"nanobatch"`` on a stage that receives activations (ghost's two backward
  passes would send back twice the gradient, nanobatch none). Every
  ``step()`` refuses stages at different logical steps or with different σ
  (``set_noise_multiplier`` on one stage only), and a stage with activations
  or gradients still in flight.

Checkpoints of pipeline stages are refused for now (they must be written and
restored by all stages together: per-stage files could let two stages resume
one noise stream, or a secure resume draw different samples per stage).

References:
    He et al. Exploring the limits of differentially private deep learning
    with group-wise clipping. ICLR 2023.
"""

from swiftdp.pipeline.link import StageLink
from swiftdp.pipeline.stages import (
    StageOptimizer,
    has_loss,
    join_stages,
    sample_state,
    stage_order,
)

__all__ = ["StageLink", "StageOptimizer", "has_loss", "join_stages", "sample_state",
           "stage_order"]
