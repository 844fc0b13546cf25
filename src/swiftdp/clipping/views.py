"""Augmentation multiplicity: K views of each example, clipped as one example.

De et al. (2022) average the gradients of K augmented views of each example
*before* clipping: the clipped unit stays the example, so the sensitivity
stays ``C`` (clipping each view on its own would let one example move the sum
by ``K·C``). With ``augmult=K`` the engine takes the views on a dimension of
their own, inputs ``(B, K, ...)``, and runs the model on ``(B·K, ...)``: the
flatten happens under the tracer, so every activation after it is marked as
a batch merged with ``K`` rows per example (:mod:`.batchdim`), and every
layer rule sums an example's rows before its norm is taken (row-wise layers
run on ``(B, K, ...)``; convolutions and group norms sum their rows'
contributions, :meth:`~swiftdp.clipping.tracer.Tracer._row_grouped`). The
outputs come back as ``(B, K, ...)``, so a loss over them is a loss over each
example's views (e.g. :func:`swiftdp.losses.per_example_cross_entropy`, or
``F.cross_entropy(out.flatten(0, 1), y.flatten())`` with the labels
``(B, K)`` that ``dp.data_loader`` yields): a mean over the ``B·K`` views
makes each example's gradient the mean over its views, as in De et al.

Only training forwards (gradient enabled, engine not suspended) and the
independence probe's take views; a forward under ``torch.no_grad()`` (an
evaluation) gets its arguments unchanged.

Reference:
    De, Berrada, Hayes, Smith, Balle. Unlocking high-accuracy differentially
    private image classification through scale. 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

from swiftdp.errors import InvalidArgumentError

__all__ = ["check_augmult", "check_views", "merge_views", "split_views"]


def check_augmult(value: object) -> int:
    """``augmult``: the number of views per example, a positive int (1: none)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"`augmult` must be a positive int (the number of augmented views of each "
            f"example; 1 for none), got {value!r}."
        )
    return value


def check_views(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, views: int) -> None:
    """Refuse a batched argument that does not hold ``views`` views of each example.

    Every tensor argument with ``batch`` rows must be ``(B, K, ...)``: the
    engine cannot tell which rows of anything else belong to which example.

    Raises:
        InvalidArgumentError: naming the argument, its shape and the fix.
    """
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for path, t in leaves:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch * views and views > 1:
            # Rows the engine cannot credit: neither marked as the batch nor probed.
            raise InvalidArgumentError(
                f"augmult={views}: the model's argument {_name(path)} has shape "
                f"{tuple(t.shape)}, {batch} x {views} rows already flattened. Pass every "
                f"batched argument as (B, {views}, ...), as dp.data_loader yields it: the "
                "engine flattens it itself and then knows which rows are whose.")
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch and (
                t.dim() < 2 or t.shape[1] != views):
            raise InvalidArgumentError(
                f"augmult={views}: the model's argument {_name(path)} has shape "
                f"{tuple(t.shape)}, but a training forward takes each batched argument as "
                f"(B, {views}, ...), the {views} augmented views of each of the B examples "
                "(what dp.data_loader yields with augmult). Pass the loader's batch as it "
                "comes; evaluate under torch.no_grad(), where arguments pass unchanged."
            )


def merge_views(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, views: int, *,
                check: bool = True) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Every argument ``(B, K, ...)`` as ``(B·K, ...)``, example-major; the rest unchanged.

    ``check=False``: the arguments were :func:`check_views`-ed already.
    """
    if check:
        check_views(args, kwargs, batch, views)

    def merge(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() > 1 and t.shape[0] == batch:
            return t.flatten(0, 1)
        return t

    return pytree.tree_map(merge, (args, kwargs))  # type: ignore[no-any-return]


def split_views(output: Any, batch: int, views: int,
                merged: Callable[[Tensor], bool] | None = None) -> Any:
    """Every output ``(B·K, ...)`` as ``(B, K, ...)``; the rest unchanged.

    ``merged(t)``: whether ``t``'s rows are the merged views (the tracer's
    mark); without it, by size.
    """
    def split(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch * views:
            return t
        if merged is not None and not merged(t):
            return t
        return t.unflatten(0, (batch, views))

    return pytree.tree_map(split, output)


def _name(path: Any) -> str:
    keys = pytree.keystr(path[1:]) if len(path) > 1 else ""
    if path and getattr(path[0], "idx", None) == 1:  # kwargs
        return f"`{keys.strip('[]').strip(chr(39))}`" if keys else "(keyword)"
    return f"#{keys.strip('[]')}" if keys else "(positional)"
