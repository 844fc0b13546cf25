"""ResNet-18-style networks with GroupNorm (never BatchNorm, which mixes examples)."""

from __future__ import annotations

from torch import Tensor, nn

_WIDTHS = {"small": (16, 32, 64, 128), "medium": (64, 128, 256, 512)}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution (and of the shortcut).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNetGN(nn.Module):
    """ResNet-18 layout (4 stages of 2 basic blocks) with GroupNorm, for CIFAR-sized input.

    The stem is one 3x3 convolution (no max-pool), as usual for 32x32 images.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output classes.
        size: ``"small"`` (widths 16-128) or ``"medium"`` (64-512, ResNet-18's).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, size: str = "small") -> None:
        super().__init__()
        widths = _WIDTHS[size]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False),
                                  _norm(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))
