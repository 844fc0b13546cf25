"""Whole models against the one-example-at-a-time oracle (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.harness import MODES, check_against_oracle


class ResNetGN(nn.Module):
    """A small ResNet-style CNN with GroupNorm, a depthwise block and a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.gn1(self.stem(x)))
        h = h + F.relu(self.gn2(self.pw(self.dw(h))))
        h = F.relu(self.down(h))
        return self.head(h.mean((2, 3)))


class TinyGPT(nn.Module):
    """Causal LM with tied input/output embeddings and a position-embedding parameter."""

    def __init__(self, vocab=11, d=8, t=6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        t = idx.shape[1]
        h = self.tok(idx) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.ln(h))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.lstm = nn.LSTM(6, 7, batch_first=True)
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        _, (h, _) = self.lstm(self.emb(x))
        return self.fc(h[-1])


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _lm(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_resnet_groupnorm_depthwise_cnn(mode):
    torch.manual_seed(0)
    model = ResNetGN().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    check_against_oracle(model, x, y, mode=mode, per_example=_ce, max_grad_norm=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_encoder_with_stock_multihead_attention(mode):
    torch.manual_seed(1)
    model = EncoderClassifier().double()
    x = torch.randint(0, 17, (4, 5))
    y = torch.randint(0, 3, (4,))
    check_against_oracle(model, x, y, mode=mode, per_example=_ce, max_grad_norm=0.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpt_with_tied_embeddings_and_position_parameter(mode, reduction):
    torch.manual_seed(2)
    model = TinyGPT().double()
    x = torch.randint(0, 11, (3, 6))
    y = torch.randint(0, 11, (3, 6))
    check_against_oracle(model, x, y, mode=mode, reduction=reduction, per_example=_lm, max_grad_norm=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_lstm_classifier(mode):
    torch.manual_seed(3)
    model = LSTMClassifier().double()
    x = torch.randint(0, 13, (4, 5))
    y = torch.randint(0, 3, (4,))
    check_against_oracle(model, x, y, mode=mode, per_example=_ce, max_grad_norm=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_partly_frozen_model_clips_only_trainable_parameters(mode):
    torch.manual_seed(4)
    model = ResNetGN().double()
    for name, p in model.named_parameters():
        if not (name.startswith("head") or name.endswith("bias")):
            p.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    check_against_oracle(model, x, y, mode=mode, per_example=_ce, max_grad_norm=0.5)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
