"""Augmented views of each example, for augmentation multiplicity (De et al. 2022).

:class:`Views` turns a batch ``(x, y, ...)`` of ``B`` examples into ``K``
augmented views of each: ``x`` becomes ``(B, K, ...)`` (``augment`` applied
``K`` times), every other tensor is repeated along a new dimension 1
(``y`` becomes ``(B, K)``, each view with its example's label). This is what
``dp.data_loader`` yields with ``make_private(augmult=K, augment=...)``;
the engine clips the ``K`` views of an example as that one example.

``augment`` must transform each example on its own: a transform that mixes
examples (mixup, cutmix across the batch, a batch statistic) would let one
example reach another's views, outside anything the engine clips. So the
first batch of each input shape is probed, as the model is: ``augment`` runs
twice from the same random state, the second time with one example replaced;
any other example's views that change are refused.

The image transforms here act on float ``(B, C, H, W)`` batches, each
example with its own random draw from torch's global generator:
:func:`random_crop` (pad and crop back, De et al.'s shifts),
:func:`random_flip` (horizontal), :func:`crop_flip` (both, the CIFAR-10
recipe).

Example:
    >>> views = Views(4, crop_flip(4))
    >>> x, y = views((torch.rand(8, 3, 32, 32), torch.arange(8)))
    >>> tuple(x.shape), tuple(y.shape)
    ((8, 4, 3, 32, 32), (8, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.errors import ExampleMixingError, InvalidArgumentError

__all__ = ["Views", "crop_flip", "random_crop", "random_flip"]

Augment = Callable[[Tensor], Tensor]


def random_crop(padding: int, mode: str = "reflect") -> Augment:
    """Pad each image by ``padding`` pixels and crop back at a random offset, per example.

    Args:
        padding: the largest shift, in pixels (4 for CIFAR-10, 2 for 28x28 digits).
        mode: ``F.pad``'s mode for the border (``"reflect"``, ``"constant"``, ...).
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise InvalidArgumentError(f"`padding` must be an int >= 0, got {padding!r}.")

    def crop(x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise InvalidArgumentError(
                f"random_crop expects images (B, C, H, W), got shape {tuple(x.shape)}.")
        if padding == 0:
            return x
        b, _, h, w = x.shape
        xp = F.pad(x, (padding,) * 4, mode=mode)
        dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        idx = torch.arange(b, device=x.device)[:, None, None]
        return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()

    return crop


def random_flip(p: float = 0.5) -> Augment:
    """Flip each image horizontally with probability ``p``, per example."""
    if not 0.0 <= p <= 1.0:
        raise InvalidArgumentError(f"`p` must be in [0, 1], got {p!r}.")

    def flip(x: Tensor) -> Tensor:
        mask = torch.rand(x.shape[0], device=x.device) < p
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)

    return flip


def crop_flip(padding: int, mode: str = "reflect") -> Augment:
    """:func:`random_crop` then :func:`random_flip`: the CIFAR-10 augmentation of De et al."""
    crop, flip = random_crop(padding, mode), random_flip()
    return lambda x: flip(crop(x))


class Views:
    """``K`` augmented views of each example of a batch.

    Args:
        augmult: ``K``, the views per example.
        augment: maps a batch of inputs ``(B, ...)`` to augmented inputs of
            the same shape, each example transformed on its own; ``None``
            repeats the inputs (the model then augments each row itself).
        probe: check on every batch that ``augment`` transforms each example
            on its own (the ``K`` views built twice more, with the first and
            the last example replaced).

    Raises:
        InvalidArgumentError: ``augmult`` is not a positive int, or
            ``augment`` is not callable.
    """

    def __init__(self, augmult: int, augment: Augment | None = None, *,
                 probe: bool = True) -> None:
        if isinstance(augmult, bool) or not isinstance(augmult, int) or augmult < 1:
            raise InvalidArgumentError(
                f"`augmult` must be a positive int (views per example), got {augmult!r}.")
        if augment is not None and not callable(augment):
            raise InvalidArgumentError(
                f"`augment` must be a callable on a batch of inputs, got {type(augment).__name__}.")
        self.augmult = augmult
        self.augment = augment
        self.probe = probe

    def __call__(self, batch: Any) -> Any:
        """The batch with ``K`` views of each example (inputs augmented, the rest repeated).

        With ``augmult == 1`` the batch keeps its layout: the inputs augmented
        once, no views dimension.

        Raises:
            InvalidArgumentError: the batch is not a tensor or a tuple/list
                whose first element is the input tensor.
            ExampleMixingError: ``augment`` changed another example's views
                when one example was replaced.
        """
        if isinstance(batch, Tensor):
            return self._inputs(batch)
        if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], Tensor):
            raise InvalidArgumentError(
                "augmult needs batches `x` or `(x, y, ...)` with the input tensor first, got "
                f"{type(batch).__name__}. Return (inputs, labels) from the dataset."
            )
        rest = [self._repeat(t) for t in batch[1:]]
        return type(batch)([self._inputs(batch[0]), *rest])

    def _repeat(self, t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0 or self.augmult == 1:
            return t
        return t.unsqueeze(1).expand(t.shape[0], self.augmult, *t.shape[1:])

    def _inputs(self, x: Tensor) -> Tensor:
        fn = self.augment
        if fn is None:
            return self._repeat(x)
        if self.probe and x.shape[0] > 1:
            return _probed_views(self, x)
        return self._views(x)

    def _views(self, x: Tensor) -> Tensor:
        """``augment`` applied ``K`` times, stacked along dimension 1 (none for ``K = 1``)."""
        assert self.augment is not None
        views = [self.augment(x) for _ in range(self.augmult)]
        if any(v.shape != x.shape for v in views):
            bad = next(v for v in views if v.shape != x.shape)
            raise InvalidArgumentError(
                f"`augment` must keep the shape of its input batch {tuple(x.shape)}, "
                f"got {tuple(bad.shape)}.")
        return views[0] if self.augmult == 1 else torch.stack(views, dim=1)


def _probed_views(views: Views, x: Tensor) -> Tensor:
    """The views of ``x``, after checking that none depends on another example.

    The ``K`` views are built three times from the same random state: for
    ``x``, and for ``x`` with its first, then its last example replaced; every
    other example's views must come out identical (a transform that mixes
    examples on some calls only, ``RandomApply(mixup)``, is caught the first
    time it mixes). The random stream continues from the reference build, as
    if the views had been built once; the reference views are the ones used.
    """
    cuda = x.device if x.device.type == "cuda" else None
    start = torch.get_rng_state()
    start_cuda = torch.cuda.get_rng_state(cuda) if cuda is not None else None
    ref = views._views(x)
    after = torch.get_rng_state()
    after_cuda = torch.cuda.get_rng_state(cuda) if cuda is not None else None
    gen = torch.Generator(device=x.device).manual_seed(7919)  # not the augment's stream
    try:
        for j in sorted({0, x.shape[0] - 1}):
            y = x.clone()
            if y.is_floating_point():
                y[j] = torch.rand(y[j].shape, generator=gen, device=x.device, dtype=y.dtype) * 10 + 5
            else:
                y[j] = y[(j + 1) % len(y)]
            torch.set_rng_state(start)
            if start_cuda is not None and cuda is not None:
                torch.cuda.set_rng_state(start_cuda, cuda)
            out = views._views(y)
            keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            keep[j] = False
            if out.shape != ref.shape or not torch.equal(out[keep], ref[keep]):
                raise ExampleMixingError(
                    f"`augment` mixes the examples of a batch: replacing example {j} of "
                    f"{x.shape[0]} changed the augmented views of others (or their random "
                    "draws). Each example's views must depend on that example alone (no "
                    "mixup or batch statistics across examples); draw the same random "
                    "numbers whatever the data.")
    finally:
        torch.set_rng_state(after)
        if after_cuda is not None and cuda is not None:
            torch.cuda.set_rng_state(after_cuda, cuda)
    return ref
