"""The independence probe's backward check: no gradient may move between examples.

A straight-through term (``h + (r - r.detach())`` with ``r`` another
example's row), a custom ``autograd.Function`` whose backward mixes rows, or
a tensor hook the forward registers on an activation leave every forward
output per-example, so the forward probe (:mod:`.guard`) cannot see them;
the gradients the engine captures would still carry other examples' losses.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.errors import ExampleMixingError

__all__ = ["check_backward"]

FIX = (
    # the fix named by every independence refusal (guard.py's too)
    "Examples must be processed independently: remove the cross-example op, or replace "
    "BatchNorm-like statistics by GroupNorm/LayerNorm; if you are sure, pass "
    "check_independence=False to make_private."
)


def check_backward(probe: Any) -> None:
    """Refuse a backward that moves gradients between examples (the forward may look fine).

    A straight-through term (``h + (r - r.detach())`` with ``r`` another
    example's row), a custom ``autograd.Function`` whose backward mixes
    rows, or a tensor hook the forward registers on an activation leave
    every forward output per-example, so the forward probe cannot see
    them; the gradients the engine captures would still carry other
    examples' losses. Here the gradient of example ``j``'s outputs alone is
    taken with respect to the floating-point inputs and to the output of
    every submodule (an embedding's too, so token-only models are probed):
    at each, every other example's rows must be exactly zero (for a tensor
    with several dimensions of size ``B``, along at least one of them).
    """
    if probe.batch < 2:
        return
    gen = torch.Generator().manual_seed(104729)
    probe.restore()
    leaves = list(probe.leaves)
    points: list[tuple[str, Tensor, list[int]]] = []  # (what, tensor, candidate batch axes)
    for i, (x, ax) in enumerate(zip(probe.leaves, probe.axes, strict=True)):
        if isinstance(x, Tensor) and ax is not None and x.is_floating_point():
            leaves[i] = x.detach().clone().requires_grad_(True)
            points.append((f"input #{i}", leaves[i], [ax]))
    args, kwargs = pytree.tree_unflatten(leaves, probe.spec)
    rows = probe.batch * probe.views  # submodules see the merged views

    # Every submodule output with a B-sized dimension, first with every example replaced
    # (without gradient, before the graph the check backpropagates through is made).
    # Only a digest of each is kept (holding them would hold a forward's activations).
    replaced: list[tuple[str, Any, list[int]]] = []
    with torch.no_grad():
        _recorded(probe, rows, replaced, probe.forward_fresh, _digest)
    probe.restore()
    seen: list[tuple[str, Any, list[int]]] = []
    with torch.enable_grad():
        out = _recorded(probe, rows, seen, lambda: probe.call(args, kwargs))
    points += _batched(seen, replaced)
    outs = [t for t in pytree.tree_leaves(out)
            if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()
            and t.dim() > 0 and probe.batch in t.shape]
    if not outs or not points:
        return
    probes = sorted({0, probe.batch - 1})
    # Each point's gradient is checked by a hook as the backward reaches it and
    # dropped there: asking autograd.grad for all of them would hold every
    # activation's gradient at once (ResNet-18: about twice a step's activations).
    # The gradient is taken down to the parameters and the probed inputs, so every
    # point (each requires grad, so it has one of them upstream) is on the way.
    params = [p for p in probe.model.parameters() if p.requires_grad]
    inputs = [(what, t, axes) for what, t, axes in points if what.startswith("input #")]
    targets = [t for _, t, _ in inputs] + params
    if not targets:  # nothing trainable, no probed input: ask for the points themselves
        _check_at_points(probe, outs, points, probes, gen)
        return
    found: list[ExampleMixingError] = []
    for j in probes:
        grads = [_row_gradient(t, probe.batch, j, gen) for t in outs]  # example j's alone
        hooks = [t.register_hook(_checker(probe, what, axes, j, found))
                 for what, t, axes in points if not what.startswith("input #")]
        try:
            with torch.enable_grad():
                # (retained: a reentrant checkpoint met below falls back to the points)
                got = torch.autograd.grad(outs, targets, grads, allow_unused=True,
                                          retain_graph=True)
        except RuntimeError as e:
            if found:
                raise found[0] from None
            if "heckpoint" in str(e):
                # Reentrant checkpointing refuses autograd.grad: down to the parameters
                # the backward may enter one; the points themselves may lie above it.
                _check_at_points(probe, outs, points, probes, gen)
                return
            raise
        finally:
            for h in hooks:
                h.remove()
        if found:
            raise found[0]
        for (what, _, axes), g in zip(inputs, got[:len(inputs)], strict=True):
            if g is not None:
                _refuse_moved(probe, what, g, axes, j)
        del got


def _recorded(probe: Any, rows: int, sink: list[tuple[str, Any, list[int]]], run: Any,
              keep: Any = lambda t, axes: t) -> Any:
    """``run()`` with every submodule's floating-point outputs that have a dimension of size
    ``rows`` appended to ``sink`` as ``keep(t, axes)`` (with those dimensions), in the order
    they are made."""
    def record(name: str) -> Any:
        def hook(module: Any, a: Any, out: Any) -> None:
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0:
                    axes = [d for d in range(t.dim()) if t.shape[d] == rows]
                    if axes:
                        sink.append((f"the output of `{name}`", keep(t, axes), axes))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in probe.model.named_modules() if n]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def _batched(seen: list[tuple[str, Any, list[int]]],
             replaced: list[tuple[str, Any, list[int]]]) -> list[tuple[str, Tensor, list[int]]]:
    """The outputs in ``seen`` (with grad) that depend on the data, for the backward check.

    A dimension of size ``B`` alone does not make a tensor batched: a batch-free
    value (a ``(T, T)`` relative-position bias when ``B == T``) takes every
    example's gradient and would read as mixing. ``replaced`` holds the
    :func:`_digest` of the same outputs in a run with every example replaced by
    fresh values: one that came out bit-identical does not depend on the data
    and is left out — unless it is the same along one of its ``B``-sized
    dimensions, as rows broadcast to the batch are (a parameter expanded to it,
    whose rows the engine credits to the examples they meet). If that run made
    other outputs (data-dependent control flow), every one is kept.
    """
    points = [p for p in seen if p[1].requires_grad]
    if [(w, ax) for w, _, ax in replaced] != [(w, ax) for w, _, ax in seen]:
        return points
    return [(w, t, axes) for (w, t, axes), (_, d, _) in zip(seen, replaced, strict=True)
            if t.requires_grad and (d is None or d != _digest(t, axes))]


def _digest(t: Tensor, axes: list[int]) -> tuple[tuple[int, ...], bytes] | None:
    """The shape and a hash of ``t``'s bits; ``None`` when it is the same along one of ``axes``."""
    t = t.detach()
    if any(t.shape[ax] < 2 or bool((t == t.narrow(ax, 0, 1)).all()) for ax in axes):
        return None
    raw = t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
    return tuple(t.shape), hashlib.blake2b(raw, digest_size=32).digest()


def _check_at_points(probe: Any, outs: list[Tensor], points: list[tuple[str, Tensor, list[int]]],
                     probes: list[int], gen: torch.Generator) -> None:
    """The check with the gradients of every point asked for at once (holds them all)."""
    for n, j in enumerate(probes):
        grads = [_row_gradient(t, probe.batch, j, gen) for t in outs]
        try:
            with torch.enable_grad():
                got = torch.autograd.grad(outs, [t for _, t, _ in points], grads,
                                          allow_unused=True, retain_graph=n + 1 < len(probes))
        except RuntimeError as e:
            if "heckpoint" in str(e):  # reentrant checkpointing refuses autograd.grad
                return
            raise
        for (what, _, axes), g in zip(points, got, strict=True):
            if g is not None:
                _refuse_moved(probe, what, g, axes, j)


def _row_gradient(t: Tensor, batch: int, j: int, gen: torch.Generator) -> Tensor:
    """A random output gradient on example ``j``'s rows of ``t``, zero elsewhere."""
    g = torch.zeros_like(t)
    row = g.select(list(t.shape).index(batch), j)
    row.copy_(torch.randn(row.shape, generator=gen, dtype=torch.float64)
              .to(device=t.device, dtype=t.dtype))
    return g


def _checker(probe: Any, what: str, axes: list[int], j: int,
             found: list[ExampleMixingError]) -> Any:
    """A tensor hook checking the gradient that reaches one point (it keeps nothing)."""
    def hook(g: Tensor) -> None:
        if found:
            return
        try:
            _refuse_moved(probe, what, g, axes, j)
        except ExampleMixingError as e:
            found.append(e)
    return hook


def _refuse_moved(probe: Any, what: str, g: Tensor, axes: list[int], j: int) -> None:
    """Refuse when every candidate batch axis of ``g`` has a nonzero row of another example."""
    per = g.shape[axes[0]] // probe.batch if axes else 1
    largest = 0.0
    for ax in axes:
        rows = g.movedim(ax, 0)
        if per > 1:  # merged views: rows j·K .. j·K + K − 1 are example j's
            rows = rows.reshape(probe.batch, per, *rows.shape[1:])
        keep = torch.ones(probe.batch, dtype=torch.bool, device=g.device)
        keep[j] = False
        others = rows[keep]
        # (a non-finite example's own rows may read 0·NaN: not evidence of mixing)
        moved = (others != 0) & torch.isfinite(others)
        if not others.numel() or not bool(moved.any()):
            return
        largest = max(largest, float(others[moved].abs().max()))
    raise ExampleMixingError(
        f"The model's backward moves gradients between examples: the gradient of example "
        f"{j}'s outputs alone reached other examples' rows of {what} (largest "
        f"{largest:.3g}), although every forward output is per-example. A straight-through "
        "term across the batch (h + (r - r.detach()) with r from other rows), a custom "
        "autograd.Function whose backward mixes rows, or a tensor hook on an activation "
        "(registered in the forward or by a forward hook) does this; each example's "
        f"gradient would carry other examples' losses. Keep the backward per-example. {FIX}")
