"""Wide ResNets with GroupNorm, the architecture of De et al.'s CIFAR-10 records.

Zagoruyko and Komodakis' WRN-d-k (pre-activation blocks, three stages of
``(d - 4) / 6`` blocks of widths ``16k, 32k, 64k``) with every BatchNorm
replaced by GroupNorm (16 groups), which normalises each example with its own
statistics. De et al. (2022) train WRN-16-4 and WRN-40-4 this way (they add
weight standardisation, left out here: a parametrised weight is clipped by
swiftdp's exact but slower per-example recomputation).

References:
    Zagoruyko, Komodakis. Wide residual networks. BMVC 2016.
    De, Berrada, Hayes, Smith, Balle. Unlocking high-accuracy differentially
    private image classification through scale. 2022.
"""

from __future__ import annotations

from torch import Tensor, nn

from swiftdp.errors import InvalidArgumentError

__all__ = ["WideResNetGN"]

_GROUPS = 16


class _Block(nn.Module):
    """Pre-activation block: GN, ReLU, 3x3 conv, GN, ReLU, 3x3 conv, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(_GROUPS, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(_GROUPS, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        o = self.act(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        h = self.conv1(o)
        return self.conv2(self.act(self.norm2(h))) + skip


class WideResNetGN(nn.Module):
    """WRN-``depth``-``width`` with GroupNorm for CIFAR-sized images.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output classes.
        depth: ``6n + 4`` (16 for WRN-16-k, 40 for WRN-40-k).
        width: the widening factor ``k``.

    Raises:
        InvalidArgumentError: ``depth`` is not ``6n + 4`` or ``width`` < 1.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 16,
                 width: int = 4) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise InvalidArgumentError(f"WRN depth must be 6n + 4 >= 10, got {depth}.")
        if width < 1:
            raise InvalidArgumentError(f"WRN width must be >= 1, got {width}.")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(_Block(cin, w, 2 if stage > 0 and i == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(min(_GROUPS, cin), cin)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        h = self.act(self.norm(self.blocks(self.stem(x))))
        return self.head(self.pool(h).flatten(1))
