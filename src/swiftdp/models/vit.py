"""A small Vision Transformer (patch 4) built from stock torch modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_SIZES = {
    # dim, depth, heads
    "small": (64, 4, 4),
    "medium": (192, 12, 3),  # ViT-Tiny
}


class ViT(nn.Module):
    """Patch embedding (a stride-``patch`` conv), class token, position embeddings,
    a pre-norm ``nn.TransformerEncoder``, and a linear head on the class token.

    Args:
        input_shape: ``(C, H, W)``; H and W must be multiples of ``patch``.
        num_classes: output classes.
        size: ``"small"`` (64 wide, 4 layers, 4 heads) or ``"medium"`` (ViT-Tiny:
            192 wide, 12 layers, 3 heads).
        patch: patch side.

    Raises:
        ValueError: the image side is not a multiple of ``patch``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, size: str = "small",
                 patch: int = 4) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(
                f"vit-tiny needs image sides that are multiples of the patch size {patch}, "
                f"got {h}x{w}."
            )
        dim, depth, heads = _SIZES[size]
        self.patch = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])
