"""``fix(model)``: replace layers that mix examples by ones that do not."""

from __future__ import annotations

import copy

from torch import nn


def _groups_for(channels: int, max_groups: int = 32) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def fix(model: nn.Module, *, max_groups: int = 32, inplace: bool = False) -> nn.Module:
    """Return a model with every BatchNorm replaced by an affine GroupNorm.

    BatchNorm normalises with batch statistics, so each example's output (and
    gradient) depends on the other examples: per-example clipping, hence
    differential privacy, is undefined. GroupNorm normalises each example on
    its own.

    Args:
        model: the model (not modified unless ``inplace``).
        max_groups: the largest number of groups; the largest divisor of the
            channel count not above it is used.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fixed model.
    """
    model = model if inplace else copy.deepcopy(model)
    targets = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    if isinstance(model, targets):
        return nn.GroupNorm(_groups_for(model.num_features, max_groups), model.num_features)
    for name, child in list(model.named_children()):
        if isinstance(child, targets):
            gn = nn.GroupNorm(_groups_for(child.num_features, max_groups), child.num_features,
                              eps=child.eps, affine=True)
            if child.weight is not None:
                gn.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(model, name, gn)
        else:
            fix(child, max_groups=max_groups, inplace=True)
    return model
