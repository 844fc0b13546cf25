"""Normalisation layers with affine parameters: LayerNorm, RMSNorm, GroupNorm, InstanceNorm.

Each example is normalised with its own statistics, so the per-example
gradients of the affine parameters are cheap to instantiate: with ``x̂`` the
normalised input (no affine) and ``g`` the output gradient,
``weight grad_i = Σ x̂ ⊙ g`` and ``bias grad_i = Σ g``, the sums running over
the positions of example ``i`` that share a parameter entry. ``x̂`` is
recomputed in the backward from the detached input (one normalisation
without affine; for LayerNorm from the mean and 1/std the forward kernel
saved), so the forward output is the native kernel's, bit for bit. An input
modified in place between the forward and the backward is refused.

References:
    Ba, Kiros, Hinton. Layer normalization. 2016. Wu, He. Group
    normalization. ECCV 2018. Zhang, Sennrich. Root mean square layer
    normalization. NeurIPS 2019. Ulyanov, Vedaldi, Lempitsky. Instance
    normalization. 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.clipping.contributions import Contribution, PerSampleGrads
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind, check_batch, raise_unbatched

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder


def affine_use(
    rec: Recorder,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    compute: Callable[[Tensor | None, Tensor | None], Tensor],
    normalize: Callable[[Tensor], Tensor],
    reduce: Callable[[Tensor], Tensor],
) -> Tensor:
    """Run a normalisation ``x̂ ⊙ weight + bias`` and capture its affine parameters.

    Args:
        rec: the active tracer.
        x: the input.
        weight: scale, captured when it is a trainable parameter.
        bias: shift, captured when it is a trainable parameter.
        compute: ``compute(weight, bias)`` runs the native op (the trainable
            ones passed detached).
        normalize: ``normalize(x)`` gives ``x̂``, the normalised input without
            affine, shaped like ``x``.
        reduce: maps a tensor shaped like ``x`` to ``(B, *param.shape)`` by
            summing over the positions that share a parameter entry.

    Returns:
        The op's output, identical to the native op's.
    """
    w_t = weight is not None and rec.site.is_trainable(weight)
    b_t = bias is not None and rec.site.is_trainable(bias)
    wd = weight.detach() if (weight is not None and w_t) else weight
    bdt = bias.detach() if (bias is not None and b_t) else bias
    xd = x.detach()
    version = xd._version
    path = rec.site.module_path

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        out: list[Contribution] = []
        if w_t:
            assert weight is not None
            # x̂ is formed from the input now, in the backward: an in-place change
            # since the forward (which autograd does not see when the input needs
            # no grad) would give the weight a gradient of another input.
            if xd._version != version:
                raise UnsupportedModuleError(
                    f"In module `{path}`, the input of a normalisation layer was modified in "
                    "place after the layer used it, so its per-example weight gradients cannot "
                    "be formed. Make the in-place operation out of place (e.g. inplace=False)."
                )
            out.append(PerSampleGrads(weight, reduce(normalize(xd) * g)))
        if b_t:
            assert bias is not None
            out.append(PerSampleGrads(bias, reduce(g)))
        return out

    params = [weight if w_t else None, bias if b_t else None]
    return rec.track(lambda: compute(wd, bdt), [x], params, build)


def _trailing(rec: Recorder, x: Tensor, shape: Sequence[int], what: str) -> Callable[[Tensor], Tensor]:
    """Reduction for parameters over the trailing ``shape`` dims (LayerNorm, RMSNorm)."""
    if x.dim() < 1:
        raise_unbatched(rec.site, x)
    k = len(shape)
    bd = rec.site.batch_dim if x.dim() >= 3 else 0
    if x.dim() - k <= bd:
        raise UnsupportedModuleError(
            f"In module `{rec.site.module_path}`, {what} normalises over the last {k} dimension(s) "
            f"of an input of shape {tuple(x.shape)}, which include the batch dimension {bd}: "
            "the statistics mix the examples of the batch. Normalise over feature dimensions "
            "only (normalized_shape must not cover the batch)."
        )
    check_batch(rec.site, x, bd, f"the input of {what}")
    lead = tuple(d for d in range(x.dim() - k) if d != bd)

    def reduce(t: Tensor) -> Tensor:
        if lead:
            t = t.sum(lead)
        return t  # the batch dim is the only leading dim left: (B, *shape)

    return reduce


def _channels(rec: Recorder, x: Tensor, what: str) -> Callable[[Tensor], Tensor]:
    """Reduction for per-channel parameters of ``(N, C, *spatial)`` inputs (GroupNorm, InstanceNorm)."""
    if x.dim() < 2:
        raise_unbatched(rec.site, x)
    check_batch(rec.site, x, 0, f"the input of {what} (layout (N, C, *))")
    spatial = tuple(range(2, x.dim()))

    def reduce(t: Tensor) -> Tensor:
        return t.sum(spatial) if spatial else t

    return reduce


def layer_norm_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.layer_norm`` (``bias`` optional)."""
    a = bind(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs,
             {"weight": None, "bias": None, "eps": 1e-5})
    x, shape, eps = a["input"], tuple(a["normalized_shape"]), a["eps"]
    reduce = _trailing(rec, x, shape, "a layer norm")
    # The native kernel hands back the mean and 1/std it normalised with, so the
    # backward forms x̂ = (x − mean)·rstd in two elementwise ops instead of a second
    # layer norm: bit-identical on the CPU, 0.75 -> 0.10 ms for a (64, 128, 64)
    # input at 1 thread (four of them in the transformer, nine in ViT-tiny).
    # Under autocast, F.layer_norm keeps its own cast policy.
    native = (x.dtype in (torch.float32, torch.float64) and x.numel() > 0
              and not torch.is_autocast_enabled(x.device.type))
    stats: list[Tensor] = []

    def compute(w: Tensor | None, b: Tensor | None) -> Tensor:
        if not native:
            return F.layer_norm(x, shape, w, b, eps)
        out, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        stats[:] = [mean.detach(), rstd.detach()]
        return out

    def normalize(t: Tensor) -> Tensor:
        if stats:
            mean, rstd = stats
            return (t - mean) * rstd
        return F.layer_norm(t, shape, None, None, eps)

    return affine_use(rec, x, a["weight"], a["bias"], compute, normalize, reduce)


def rms_norm_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.rms_norm`` (``eps=None``: ``torch.finfo(dtype).eps``)."""
    a = bind(("input", "normalized_shape", "weight", "eps"), args, kwargs,
             {"weight": None, "eps": None})
    x, shape, eps = a["input"], tuple(a["normalized_shape"]), a["eps"]
    reduce = _trailing(rec, x, shape, "an RMS norm")
    return affine_use(
        rec, x, a["weight"], None,
        lambda w, b: F.rms_norm(x, shape, w, eps),
        lambda t: F.rms_norm(t, shape, None, eps),
        reduce,
    )


def group_norm_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.group_norm`` (per-channel affine)."""
    a = bind(("input", "num_groups", "weight", "bias", "eps"), args, kwargs,
             {"weight": None, "bias": None, "eps": 1e-5})
    x, groups, eps = a["input"], a["num_groups"], a["eps"]
    reduce = _channels(rec, x, "a group norm")
    return affine_use(
        rec, x, a["weight"], a["bias"],
        lambda w, b: F.group_norm(x, groups, w, b, eps),
        lambda t: F.group_norm(t, groups, None, None, eps),
        reduce,
    )


def instance_norm_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.instance_norm`` (per-channel affine).

    Raises:
        UnsupportedModuleError: running statistics would be updated from the
            batch (``track_running_stats=True`` in training mode): they are
            released with the model but computed from private data without
            noise.
    """
    a = bind(
        ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
         "eps"), args, kwargs,
        {"running_mean": None, "running_var": None, "weight": None, "bias": None,
         "use_input_stats": True, "momentum": 0.1, "eps": 1e-5},
    )
    x, rm, rv = a["input"], a["running_mean"], a["running_var"]
    use_stats, momentum, eps = bool(a["use_input_stats"]), a["momentum"], a["eps"]
    if use_stats and (rm is not None or rv is not None):
        raise UnsupportedModuleError(
            f"In module `{rec.site.module_path}`, an instance norm updates running statistics "
            "(track_running_stats=True in training mode): they are averaged over the private "
            "batch and released with the model without noise, which breaks differential "
            "privacy. Use track_running_stats=False (training then uses per-example statistics "
            "anyway)."
        )
    reduce = _channels(rec, x, "an instance norm")
    if use_stats:
        def normalize(t: Tensor) -> Tensor:
            return F.instance_norm(t, None, None, None, None, True, 0.0, eps)
    else:  # fixed running statistics (eval mode): snapshot them for the backward
        rm_c = rm.detach().clone() if rm is not None else None
        rv_c = rv.detach().clone() if rv is not None else None

        def normalize(t: Tensor) -> Tensor:
            return F.instance_norm(t, rm_c, rv_c, None, None, False, 0.0, eps)

    def compute(w: Tensor | None, b: Tensor | None) -> Tensor:
        if x.shape[0] == 0:  # native kernel fails on no example; an empty Poisson batch is normal
            return x * 0.0
        return F.instance_norm(x, rm, rv, w, b, use_stats, momentum, eps)

    return affine_use(
        rec, x, a["weight"], a["bias"],
        compute,
        normalize,
        reduce,
    )
