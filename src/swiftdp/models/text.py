"""Text models on token ids: a Transformer classifier, an LSTM classifier, a tiny GPT.

Inputs are int64 token ids ``(B, T)`` in ``[0, vocab_size)``; id 0 is padding
for the classifiers (``padding_idx=0``). Stock torch modules only
(``nn.Embedding``, ``nn.TransformerEncoderLayer`` with its
``nn.MultiheadAttention``, ``nn.LSTM``, ``nn.LayerNorm``), so swiftdp clips
them without module replacement.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_SIZES = {
    # dim, depth, heads
    "small": (64, 2, 4),
    "medium": (256, 4, 8),
}


def _encoder(dim: int, depth: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
        batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class TransformerClassifier(nn.Module):
    """Token and position embeddings, a pre-norm Transformer encoder, mean pooling, a linear head.

    Args:
        vocab_size: number of token ids (0 is padding).
        seq_len: the longest sequence (size of the position table).
        num_classes: output classes.
        size: ``"small"`` (64 wide, 2 layers, 4 heads) or ``"medium"`` (256, 4, 8).
        dropout: dropout rate inside the encoder.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int, size: str = "small",
                 dropout: float = 0.0) -> None:
        super().__init__()
        dim, depth, heads = _SIZES[size]
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.encoder = _encoder(dim, depth, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for token ids ``(B, T)``."""
        t = tokens.shape[1]
        pad = tokens == 0
        h = self.embed(tokens) + self.pos[:, :t]
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)


class LSTMClassifier(nn.Module):
    """Token embeddings, an ``nn.LSTM``, the last hidden state, a linear head.

    Args:
        vocab_size: number of token ids (0 is padding).
        num_classes: output classes.
        size: ``"small"`` (64 wide, 1 layer) or ``"medium"`` (256 wide, 2 layers).
    """

    def __init__(self, vocab_size: int, num_classes: int, size: str = "small") -> None:
        super().__init__()
        dim, depth, _ = _SIZES[size]
        layers = 1 if size == "small" else 2
        del depth
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for token ids ``(B, T)``."""
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class TinyGPT(nn.Module):
    """A causal language model with tied input and output embeddings.

    The output layer reuses the token embedding matrix (``logits = h Eᵀ``),
    so one parameter is used twice per example: swiftdp clips it exactly,
    cross terms included.

    Args:
        vocab_size: number of token ids (the number of output logits).
        seq_len: the longest sequence (size of the position table).
        size: ``"small"`` (64 wide, 2 layers, 4 heads) or ``"medium"`` (256, 4, 8).
        dropout: dropout rate inside the blocks.
    """

    def __init__(self, vocab_size: int, seq_len: int, size: str = "small",
                 dropout: float = 0.0) -> None:
        super().__init__()
        dim, depth, heads = _SIZES[size]
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.blocks = _encoder(dim, depth, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len),
                             persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, T, vocab_size)`` for token ids ``(B, T)``."""
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:, :t]
        h = self.blocks(h, mask=self.get_buffer("mask")[:t, :t], is_causal=True)
        return torch.nn.functional.linear(self.norm(h), self.embed.weight)
