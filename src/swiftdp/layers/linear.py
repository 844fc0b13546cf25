"""Linear layers (``F.linear`` on any leading dimensions).

``G_i = g_iᵀ a_i`` with ``a_i`` the ``(T, d)`` inputs and ``g_i`` the
``(T, p)`` output gradients of example ``i``; bias gradient ``Σ_t g_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from swiftdp.clipping.contract import Decline
from swiftdp.clipping.contributions import Contribution, LinearFactors, PerSampleGrads
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind, check_batch, raise_unbatched

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder


def as_sequence(t: Tensor, batch_dim: int) -> Tensor:
    """``(B, T, f)`` view of an activation with the batch at ``batch_dim``."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if batch_dim != 0:
        t = t.movedim(batch_dim, 0)
    return t.reshape(t.shape[0], t.shape[1:-1].numel(), t.shape[-1])


def linear_use(
    rec: Recorder,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    compute: Callable[[], Tensor] | None = None,
    transposed: bool = False,
) -> Tensor:
    """Run ``F.linear(x, weight, bias)`` and capture it for clipping.

    Args:
        rec: the active tracer.
        x: input ``(..., d)``.
        weight: ``(p, d)`` (``(d, p)`` when ``transposed``: ``x @ weight``);
            captured when it is a trainable parameter.
        bias: ``(p,)`` or ``None``; captured when trainable.
        compute: optional replacement of the forward computation.
        transposed: the weight is stored ``(d, p)`` (``torch.addmm(bias, x,
            weight)``, Hugging Face's ``Conv1D``).

    Returns:
        The output, identical to ``F.linear``'s.
    """
    w_t = rec.site.is_trainable(weight)
    b_t = bias is not None and rec.site.is_trainable(bias)
    if x.dim() < 2:
        raise_unbatched(rec.site, x)
    bd = rec.site.batch_dim if x.dim() >= 3 else 0
    check_batch(rec.site, x, bd, "the input of a linear layer")
    xd = x.detach()
    version = xd._version
    path = rec.site.module_path
    wd = weight.detach() if w_t else weight
    bdt = bias.detach() if (bias is not None and b_t) else bias

    def run() -> Tensor:
        if compute is not None:
            return compute()
        return F.linear(x, wd.t() if transposed else wd, bdt)

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        g3 = as_sequence(g, bd)
        out: list[Contribution] = []
        if w_t:
            if xd._version != version:
                raise UnsupportedModuleError(
                    f"In module `{path}`, the input of a linear layer was modified in place "
                    "after the layer used it, so its per-example weight gradients cannot be "
                    "formed. Make the in-place operation out of place (e.g. inplace=False)."
                )
            a3 = as_sequence(xd, bd)
            t, d, p = a3.shape[1], a3.shape[2], g3.shape[2]
            if transposed:  # G_i = a_iᵀ g_i, (d, p): the same factors, roles swapped
                out.append(LinearFactors(weight, g3, a3, ghost=policy.factored(t, p, d)))
            else:
                out.append(LinearFactors(weight, a3, g3, ghost=policy.factored(t, d, p)))
        if b_t:
            assert bias is not None
            out.append(PerSampleGrads(bias, g3[:, 0] if g3.shape[1] == 1 else g3.sum(1)))
        return out

    return rec.track(run, [x], [weight if w_t else None, bias if b_t else None], build)


def addmm_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.addmm(bias, x, weight)`` with a trainable ``(d, p)`` weight.

    Hugging Face's ``Conv1D`` (GPT-2) on a batch merged into the rows; the
    dispatcher hands it ``x`` as ``(B, T, d)``. Anything else (``beta`` or
    ``alpha`` set, the weight as the first matrix) is declined to the generic
    rule.
    """
    a = bind(("input", "mat1", "mat2"), args, kwargs, {})
    bias, x, weight = a.get("input"), a.get("mat1"), a.get("mat2")
    if (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3
            or not isinstance(x, Tensor) or not isinstance(weight, Tensor)
            or not rec.site.is_trainable(weight) or rec.site.is_trainable(x)
            or not isinstance(bias, Tensor) or bias.dim() != 1):
        raise Decline
    return linear_use(rec, x, weight, bias, transposed=True)


def linear_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.linear``."""
    a = bind(("input", "weight", "bias"), args, kwargs, {"bias": None})
    return linear_use(rec, a["input"], a["weight"], a["bias"])
