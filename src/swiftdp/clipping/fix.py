"""``fix(model)``: replace layers that mix examples by ones that do not."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from swiftdp.errors import UnsupportedModuleError

log = logging.getLogger("swiftdp")

_TARGETS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def _groups_for(channels: int, max_groups: int = 32) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class NormAct(nn.Sequential):
    """A GroupNorm followed by the modules a fused norm layer applied after normalising.

    What :func:`fix` puts in place of a fused norm-and-activation module such as
    timm's ``BatchNormAct2d`` (``bn -> drop -> act``): the same activation, the
    same dropout, the normalisation per example.
    """


def fix(model: nn.Module, *, max_groups: int = 32, inplace: bool = False,
        report: list[str] | None = None) -> nn.Module:
    """Return a model with every BatchNorm replaced by an affine GroupNorm.

    BatchNorm normalises with batch statistics, so each example's output (and
    gradient) depends on the other examples: per-example clipping, hence
    differential privacy, is undefined. GroupNorm normalises each example on
    its own.

    A BatchNorm subclass with modules of its own (timm's ``BatchNormAct2d``,
    which applies ``drop`` then ``act`` after normalising) becomes a
    :class:`NormAct`: the GroupNorm, then those modules in the order they are
    registered. That order is checked, not assumed: the original module is run
    with its normalisation made a known affine map and must give what its
    modules give after that map, in that order; otherwise the module is
    refused, since its architecture could not be kept.

    Every replacement is logged (logger ``"swiftdp"``, level INFO) and, when
    ``report`` is a list, appended to it as ``"path: old -> new"``.

    Args:
        model: the model (not modified unless ``inplace``).
        max_groups: the largest number of groups; the largest divisor of the
            channel count not above it is used.
        inplace: modify ``model`` itself instead of a deep copy.
        report: a list that receives one line per replacement.

    Returns:
        The fixed model.

    Raises:
        UnsupportedModuleError: a fused norm module whose extra modules do not
            simply follow the normalisation.
    """
    model = model if inplace else copy.deepcopy(model)
    lines: list[str] = []
    if isinstance(model, _TARGETS):
        out = _replacement(model, max_groups, "<model>", lines)
    else:
        _fix_children(model, max_groups, "", lines)
        out = model
    for line in lines:
        log.info("swiftdp.fix: %s", line)
    if report is not None:
        report.extend(lines)
    return out


def _fix_children(module: nn.Module, max_groups: int, prefix: str, lines: list[str]) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, _TARGETS):
            setattr(module, name, _replacement(child, max_groups, path, lines))
        else:
            _fix_children(child, max_groups, path + ".", lines)


def _replacement(bn: nn.Module, max_groups: int, path: str, lines: list[str]) -> nn.Module:
    c = int(bn.num_features)  # type: ignore[arg-type]
    gn = nn.GroupNorm(_groups_for(c, max_groups), c, eps=float(bn.eps),  # type: ignore[arg-type]
                      affine=True)
    weight = getattr(bn, "weight", None)
    if isinstance(weight, Tensor):
        gn.to(device=weight.device, dtype=weight.dtype)
    extra = list(bn.named_children())
    if not extra:
        lines.append(f"{path}: {bn} -> {gn}")
        return gn
    _check_follows(bn, [m for _, m in extra], path)
    new = NormAct(gn, *(copy.deepcopy(m) for _, m in extra))
    kept = ", ".join(f"{n}={type(m).__name__}" for n, m in extra)
    lines.append(f"{path}: {type(bn).__name__}({c}) -> GroupNorm({gn.num_groups}, {c}) + "
                 f"{kept}")
    return new


class _NormAsAffine(TorchFunctionMode):
    """Batch norm returns ``2x - 0.5``: what a fused module does around normalising shows.

    (An affine map, not the identity, so that an activation applied before the
    norm does not pass for one applied after it.)
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in (F.batch_norm, torch.batch_norm):
            x = args[0] if args else (kwargs or {})["input"]
            return 2.0 * x - 0.5
        return func(*args, **(kwargs or {}))


def _check_follows(bn: nn.Module, extra: list[nn.Module], path: str) -> None:
    probe = copy.deepcopy(bn).eval()
    tail = nn.Sequential(*(copy.deepcopy(m) for m in extra)).eval()
    weight = getattr(bn, "weight", None)
    dtype = weight.dtype if isinstance(weight, Tensor) else torch.float32
    device = weight.device if isinstance(weight, Tensor) else None
    c = int(bn.num_features)  # type: ignore[arg-type]
    dims = {nn.BatchNorm1d: 3, nn.BatchNorm3d: 5}
    nd = next((d for k, d in dims.items() if isinstance(bn, k)), 4)
    x = torch.randn(2, c, *([5] * (nd - 2)), dtype=dtype, device=device,
                    generator=None) * 2.0
    try:
        with torch.no_grad(), _NormAsAffine():
            got = probe(x)
        with torch.no_grad():
            want = tail(2.0 * x - 0.5)
        same = isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want)
    except Exception as e:  # a module that cannot run on a probe input
        raise UnsupportedModuleError(
            f"swiftdp.fix cannot replace `{path}` ({type(bn).__name__}): running it to check "
            f"what it applies after normalising failed ({type(e).__name__}: {e}).") from e
    if not same:
        raise UnsupportedModuleError(
            f"swiftdp.fix cannot replace `{path}` ({type(bn).__name__}): besides batch "
            "normalisation it does more than apply its modules "
            f"({', '.join(type(m).__name__ for m in extra)}) in order, so replacing it would "
            "change the architecture. Replace it by hand with a GroupNorm and what follows.")
