"""A node at the model's outputs whose backward runs the engine's own passes.

Ghost clipping and the nanobatch mode need the gradient of the loss with
respect to the model's outputs before anything flows into the model: the
node below receives it and hands it to a callback, which runs its own
backward passes over the (retained) model graph, with ``torch.autocast`` off
(the engine's arithmetic keeps its own dtypes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.utils import _pytree as pytree

from swiftdp.clipping.rounding import autocast_off

OutputsBackward = Callable[[list[Tensor], list[Tensor]], None]


class _Boundary(Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, callback: OutputsBackward, outs: list[Tensor], anchor: Tensor
    ) -> Any:
        # The model outputs travel outside autograd's view (in a list), so the
        # outer backward stops here and never visits the model graph, which
        # ``callback`` traverses on its own.
        del anchor
        ctx.callback = callback
        ctx.outs = tuple(outs)
        return tuple(o.detach().clone() for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        outs: tuple[Tensor, ...] = ctx.outs
        ctx.outs = None
        gs = [g if g is not None else torch.zeros_like(o) for o, g in zip(outs, grads, strict=True)]
        with torch.enable_grad(), autocast_off():
            ctx.callback(list(outs), gs)
        return None, None, None


def wrap_outputs(anchor: Tensor, output: Any, callback: OutputsBackward) -> Any:
    """Route the gradient of every output tensor that requires grad through ``callback``.

    ``anchor`` is a leaf that requires grad, so the node exists even when no
    output carries a graph of its own.
    """
    leaves, spec = pytree.tree_flatten(output)
    idx = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
    if not idx:
        return output
    new = _Boundary.apply(callback, [leaves[i] for i in idx], anchor)
    for j, i in enumerate(idx):
        leaves[i] = new[j]
    return pytree.tree_unflatten(leaves, spec)
