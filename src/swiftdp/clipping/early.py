"""Group-wise clipping inside the backward pass (``bk`` and ``per_sample`` modes).

With group thresholds (He et al. 2022) each example's gradient on group ``k``
is clipped to ``C_k`` by its norm over group ``k`` alone. So a group can be
clipped as soon as every use of its parameters has its output gradient —
while the backward is still running, the layers before it not yet reached —
and its per-example state (the activations and output gradients the
book-keeping factors keep, or the instantiated gradients) freed at once,
instead of held to the end of the backward as flat clipping must (its one
norm needs every layer). With one group per layer
(:func:`swiftdp.per_layer_thresholds`) the per-example state alive at any
time is about one layer's.

Completion is read conservatively: group ``k`` is ready when, for each of its
parameters, as many captures have been built in this backward as uses were
counted in the forward, and no capture touching it is half-received. A use
counted without a capture of this backward (a reentrant checkpoint's first
run, a capture a generic recomputation cancelled, an output the loss does
not reach) keeps the group waiting to the end of the backward, where it is
clipped like the rest. A contribution that reaches a group after it was
clipped is refused (the sum released would miss it), as is a threshold
changed between two groups' clipping.

A non-finite norm drops the example from that group's sum (its other groups
may be summed already); the warning counts every example dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from swiftdp.clipping.clip_fns import (
    Thresholds,
    clip_factors,
    nonfinite_examples,
    unweightable_as_inf,
)
from swiftdp.clipping.contributions import Contribution, param_weighted_sum, total_sq_norms
from swiftdp.errors import UnsupportedModuleError

if TYPE_CHECKING:
    from swiftdp.clipping.capture import Capture
    from swiftdp.clipping.step import Step

__all__ = ["EarlyGroups"]


class EarlyGroups:
    """One backward's group-wise clipping, each group clipped when its last use arrives.

    Args:
        step: the step whose backward is running (group mode).
    """

    def __init__(self, step: Step) -> None:
        eng = step.engine
        gid = eng.group_ids(step.trainable)
        limits = eng.group_limits
        assert gid is not None and limits is not None
        self.gid, self.limits = gid, limits
        self.thresholds: Thresholds = eng.max_grad_norm  # read once: every group clips to it
        self.members: dict[int, list[int]] = {k: [] for k in range(len(limits))}
        for pid, k in gid.items():
            self.members[k].append(pid)
        self.done: dict[int, int] = {}  # parameter id -> captures built
        self.waiting: dict[int, list[Contribution]] = {}  # group -> contributions built
        # group -> (norms, factors), None when no example reached it
        self.clipped: dict[int, tuple[Tensor, Tensor] | None] = {}
        self.sums: dict[int, Tensor] = {}
        self.dropped: list[Tensor] = []

    def built(self, step: Step, cap: Capture, contribs: list[Contribution]) -> None:
        """A capture's contributions were built: keep them, and clip the groups it completes."""
        self._refuse_late(contribs)
        for c in contribs:
            self.waiting.setdefault(self._group(c), []).append(c)
        for pid in cap.param_ids:
            self.done[pid] = self.done.get(pid, 0) + 1
        for k in sorted({self.gid[pid] for pid in cap.param_ids if pid in self.gid}):
            if k not in self.clipped and self._ready(step, k):
                self._clip(step, k, self.waiting.pop(k, []))

    def finish(self, step: Step, rest: list[Contribution]) -> dict[int, Tensor]:
        """End of the backward: clip the groups still waiting; every group's sums."""
        self._refuse_late(rest)
        for c in rest:
            self.waiting.setdefault(self._group(c), []).append(c)
        for k in sorted(self.waiting):
            self._clip(step, k, self.waiting.pop(k))
        eng = step.engine
        known = [v for v in self.clipped.values() if v is not None]
        if known:
            ref = known[0][0]
            zeros, ones = ref.new_zeros(ref.shape), ref.new_ones(ref.shape)
            rows = [self.clipped.get(k) for k in range(len(self.limits))]
            norms = torch.stack([zeros if r is None else r[0] for r in rows])
            factors = torch.stack([ones if r is None else r[1] for r in rows])
            eng.last_norms, eng.last_clip_factors = norms, factors
            step.norms = norms
            if self.dropped:  # one warning for the step, every example dropped counted
                any_bad = torch.stack(self.dropped).any(0)
                nonfinite_examples(torch.where(any_bad, torch.inf, 0.0).to(ref.dtype),
                                   pending=eng.pending_for(ref.device))
        step.clipped_with = self.thresholds
        return self.sums

    def _group(self, c: Contribution) -> int:
        k = self.gid.get(id(c.param))
        if k is None:  # not trainable when the forward began
            raise UnsupportedModuleError(
                f"A parameter of shape {tuple(c.param.shape)} received a per-example "
                "gradient but was not among the model's trainable parameters when the "
                "forward began, so it has no clipping group. Freeze or unfreeze parameters "
                "between steps only.")
        return k

    def _refuse_late(self, contribs: Iterable[Contribution]) -> None:
        for c in contribs:
            if self._group(c) in self.clipped:
                raise UnsupportedModuleError(
                    f"A use of a parameter of shape {tuple(c.param.shape)} reached its "
                    "clipping group after the group was clipped during the backward pass (a "
                    "use the forward did not count). Its gradient cannot be clipped with its "
                    "example's; the step was refused. Please report the model; "
                    "cost_objective='time' with mode='ghost' clips at the end instead.")

    def _ready(self, step: Step, k: int) -> bool:
        uses, done = step.uses, self.done
        if any(done.get(pid, 0) < uses.get(pid, 0) for pid in self.members[k]):
            return False
        return not any(self.gid.get(pid) == k for cap in step.pending for pid in cap.param_ids)

    def _clip(self, step: Step, k: int, contribs: list[Contribution]) -> None:
        eng = step.engine
        if eng.max_grad_norm != self.thresholds:
            raise UnsupportedModuleError(
                f"The clipping thresholds changed during the backward pass (from "
                f"{self.thresholds!r} to {eng.max_grad_norm!r}), between the clipping of two "
                "groups. Change them between steps only (dp.set_max_grad_norm).")
        by_param: dict[int, list[Contribution]] = {}
        for c in contribs:
            by_param.setdefault(id(c.param), []).append(c)
        sq = total_sq_norms(by_param.values())
        if sq is None:
            self.clipped[k] = None
            return
        scale = step.scale(sq.shape[-1])
        norms = unweightable_as_inf(sq.clamp(min=0).sqrt() * scale, self.limits[k], scale,
                                    eng.clipping)
        dropped = nonfinite_examples(norms, warn=False, pending=eng.pending_for(norms.device))
        if dropped is not None:
            self.dropped.append(dropped)
        factors = clip_factors(norms, self.limits[k], eng.clipping, warn_nonfinite=False)
        weights = factors * scale
        for uses in by_param.values():
            p = uses[0].param
            self.sums[id(p)] = param_weighted_sum(p, uses, weights, dropped, detect=False)
        self.clipped[k] = (norms.detach(), factors.detach())
