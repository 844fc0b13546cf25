"""Helpers shared by the layer rules: argument binding and batch checks.

Imports the contract only, like every rule.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from swiftdp.clipping.contract import Site, Unbatched
from swiftdp.errors import UnsupportedModuleError


def bind(
    names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Map a call's positional and keyword arguments onto parameter names."""
    out = dict(defaults)
    for n, v in zip(names, args, strict=False):
        out[n] = v
    out.update(kwargs)
    return out


def check_batch(site: Site, t: Tensor, dim: int, what: str) -> None:
    """Refuse an activation that does not carry the batch along ``dim``.

    The batch is tracked from the model's inputs through every op, never
    guessed from a size: a tensor that is the same for every example is
    refused even when its dimension ``dim`` happens to equal ``B``. One
    exception: a tensor explicitly broadcast along ``dim`` (stride 0, as
    ``positions.expand(B, -1)`` makes it) counts as batched — each example
    reads its own, identical, row.

    Raises:
        UnsupportedModuleError: naming the module, the shape and the fix.
    """
    batch = site.batch_size
    if (t.dim() > dim and t.shape[dim] == batch and not site.carries_batch(t)
            and not (batch > 1 and t.stride(dim) == 0)):
        raise Unbatched(
            f"In module `{site.module_path}`, {what} has shape {tuple(t.shape)} but does not "
            "derive from the model's batched inputs: it is the same for every example (its "
            f"dimension {dim} only happens to equal the batch size {batch}). swiftdp cannot "
            "attribute this parameter use to examples. Compute it from the batch (e.g. expand "
            "position ids to the batch), or freeze the parameter."
        )
    tracked = site.batch_dim_of(t)
    if tracked is not False and tracked is not None and tracked != dim and t.shape[dim] == batch:
        raise UnsupportedModuleError(
            f"In module `{site.module_path}`, {what} has shape {tuple(t.shape)} with the batch "
            f"at dimension {tracked} (tracked from the model's inputs), but the layer reads "
            f"dimension {dim} as the batch. Move the batch back (e.g. undo the transpose), or "
            f"pass batch_first={not site.batch_first} if the model is sequence-first."
        )
    if t.dim() <= dim or t.shape[dim] != batch:
        raise (UnsupportedModuleError if site.carries_batch(t) else Unbatched)(
            f"In module `{site.module_path}`, {what} has shape {tuple(t.shape)}, whose "
            f"dimension {dim} should be the batch of size {batch}. swiftdp needs "
            "every layer to see the batch along one dimension; pass batch_first="
            f"{not site.batch_first} if the model is not batch_first="
            f"{site.batch_first}, or keep the batch dimension through the model."
        )


def raise_unbatched(site: Site, x: Tensor) -> None:
    """Refuse an input without a batch dimension."""
    raise Unbatched(
        f"In module `{site.module_path}`, a layer got an input of shape {tuple(x.shape)} "
        "without a batch dimension. Per-example clipping needs batched inputs."
    )
