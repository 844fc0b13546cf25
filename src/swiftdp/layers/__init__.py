"""Layer rules, one file per layer family, and the one table that routes to them.

Each rule is a leaf: it imports :mod:`swiftdp.clipping.contract` and the
contribution types, never the engine (an import-linter contract checks it).
``RULES`` maps a torch function, as ``__torch_function__`` sees it, to its
rule; nothing registers itself by import.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from swiftdp.clipping.contract import Rule
from swiftdp.layers import attention, conv, embedding, linear, norm, recurrent

RULES: dict[Any, Rule] = {
    F.linear: linear.linear_rule,
    torch.addmm: linear.addmm_rule,
    torch.conv1d: conv.conv_rule,
    torch.conv2d: conv.conv_rule,
    torch.conv3d: conv.conv_rule,
    F.embedding: embedding.embedding_rule,
    torch.embedding: embedding.torch_embedding_rule,
    F.layer_norm: norm.layer_norm_rule,
    F.rms_norm: norm.rms_norm_rule,
    F.group_norm: norm.group_norm_rule,
    F.instance_norm: norm.instance_norm_rule,
    F.multi_head_attention_forward: attention.mha_rule,
    torch.lstm: recurrent.rnn_rule,
    torch.gru: recurrent.rnn_rule,
    torch.rnn_tanh: recurrent.rnn_rule,
    torch.rnn_relu: recurrent.rnn_rule,
}

__all__ = ["RULES"]
