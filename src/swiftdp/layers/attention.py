"""Multi-head attention: ``F.multi_head_attention_forward``, the core of ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer`` and ``nn.Transformer``) trains unchanged: its
forward calls ``F.multi_head_attention_forward`` with every projection weight
as an argument, and this rule re-implements the training path of that
function so that each parameter use is an ordinary, captured linear use:

* the input projections ``q = x_q W_qᵀ + b_q`` (and ``k``, ``v``) are linear
  uses of ``in_proj_weight`` / ``in_proj_bias``; self-attention projects the
  packed weight at once, cross-attention projects row blocks of it, each
  captured with its ``region`` (disjoint regions add no cross term), and
  separate ``q/k/v_proj_weight`` (``kdim``, ``vdim`` ≠ ``embed_dim``) are
  used whole;
* the output projection is a linear use of ``out_proj.weight`` / ``.bias``;
* ``bias_k`` / ``bias_v`` are broadcast over the batch: they enter as one
  copy per example, whose gradient is that example's gradient;
* the attention core (masks, softmax, dropout, ``add_zero_attn``) holds no
  parameter, so autograd carries the exact output gradients back to the
  projections.

The inputs arrive as ``(T, B, E)`` (the module has already transposed
``batch_first`` inputs); the batch is always dimension 1 of ``query``.

References:
    Vaswani et al. Attention is all you need. NeurIPS 2017.
    Li et al. Large language models can be strong differentially private
    learners. ICLR 2022 (ghost clipping of attention projections).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.clipping.contributions import Contribution, LinearFactors, PerSampleGrads
from swiftdp.layers._common import bind, check_batch, raise_unbatched
from swiftdp.layers.linear import as_sequence, linear_use

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder

_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
    "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
    "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
    "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)
_DEFAULTS: dict[str, Any] = {
    "training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
    "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
    "v_proj_weight": None, "static_k": None, "static_v": None,
    "average_attn_weights": True, "is_causal": False,
}


def project(
    rec: Recorder,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w_rows: slice | None = None,
    b_rows: slice | None = None,
) -> Tensor:
    """``F.linear(x, weight[w_rows], bias[b_rows])`` captured as a linear use.

    Args:
        rec: the active tracer.
        x: input with its batch at ``rec.site.batch_dim`` (``(..., d)``).
        weight: the full weight parameter (or a frozen tensor).
        bias: the full bias parameter, or ``None``.
        w_rows: the rows of ``weight`` used (``None``: all); the use is
            captured with ``region=(w_rows,)`` on the parameter.
        b_rows: the entries of ``bias`` used (``None``: all).

    Returns:
        The projection, with the layout of ``x``.
    """
    if w_rows is None and b_rows is None:
        return linear_use(rec, x, weight, bias)
    w_t = rec.site.is_trainable(weight)
    b_t = bias is not None and rec.site.is_trainable(bias)
    bd = rec.site.batch_dim
    check_batch(rec.site, x, bd, "the input of an attention projection")
    w = weight.detach() if w_t else weight
    w = w if w_rows is None else w[w_rows]
    b = None
    if bias is not None:
        b = bias.detach() if b_t else bias
        b = b if b_rows is None else b[b_rows]

    def run() -> Tensor:
        return F.linear(x, w, b)

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        if g is None:
            return []
        g3 = as_sequence(g, bd)
        out: list[Contribution] = []
        if w_t:
            a3 = as_sequence(x.detach(), bd)
            t, d, p = a3.shape[1], a3.shape[2], g3.shape[2]
            out.append(LinearFactors(weight, a3, g3, ghost=policy.factored(t, d, p),
                                     region=None if w_rows is None else (w_rows,)))
        if b_t:
            assert bias is not None
            out.append(PerSampleGrads(bias, g3.sum(1), region=None if b_rows is None else (b_rows,)))
        return out

    return rec.track(run, [x], [weight if w_t else None, bias if b_t else None], build)


def per_example_copy(rec: Recorder, p: Tensor, batch: int) -> Tensor:
    """``p`` of shape ``(1, 1, E)`` repeated as ``(B, 1, E)``; its gradient is per example.

    Args:
        rec: the active tracer.
        p: ``bias_k`` or ``bias_v``.
        batch: the batch size ``B``.

    Returns:
        One copy of ``p`` per example, ``(B, 1, E)``.
    """
    flat = p.reshape(1, 1, p.shape[-1])
    if not rec.site.is_trainable(p):
        return flat.expand(batch, 1, -1)
    pd = flat.detach()

    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        g = grads[0]
        return [] if g is None else [PerSampleGrads(p, g.reshape(g.shape[0], *p.shape))]

    return rec.track(lambda: pd.repeat(batch, 1, 1), [], [p], build)


def float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A boolean mask as an additive float mask (``True`` → ``-inf``), as torch does."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def mha_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for ``torch.nn.functional.multi_head_attention_forward`` (training path).

    Raises:
        UnsupportedModuleError: the query is unbatched or its batch is not the
            engine's batch.
    """
    a = bind(_NAMES, args, kwargs, _DEFAULTS)
    query = a["query"]
    if query.dim() != 3:
        raise_unbatched(rec.site, query)
    check_batch(rec.site, query, 1, "the query of multi-head attention (time-major inside the module)")
    L, B, E = query.shape
    H = int(a["num_heads"])
    hd = E // H
    if E != a["embed_dim_to_check"]:
        raise AssertionError(f"was expecting embedding dimension of {a['embed_dim_to_check']}, but got {E}")
    if hd * H != E:
        raise AssertionError(f"embed_dim {E} not divisible by num_heads {H}")
    bd = rec.site.batch_dim

    def by_head(t: Tensor) -> Tensor:  # engine layout (…, E) → (B, H, S, hd)
        return _split(t if bd == 0 else t.transpose(0, 1), H)

    q, k, v = (by_head(t) for t in _in_projections(rec, a, E))
    k, v, extra = _extend_keys(rec, a, k, v)
    mask, is_causal = _mask(a, L, a["key"].shape[0], k.shape[2], extra, B, H, query.dtype)
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    weights: Tensor | None = None
    if a["need_weights"]:
        scores = torch.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        ctx = torch.matmul(attn, v)
        weights = attn.mean(dim=1) if a["average_attn_weights"] else attn
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
    ctx = ctx.transpose(1, 2).reshape(B, L, E)
    out = linear_use(rec, ctx if bd == 0 else ctx.transpose(0, 1), a["out_proj_weight"], a["out_proj_bias"])
    # Stock memory layout ((L, B, E) contiguous), so that what follows (dropout masks
    # included) behaves exactly as after the stock function.
    return (out.transpose(0, 1).contiguous() if bd == 0 else out), weights


def _split(t: Tensor, heads: int) -> Tensor:
    """``(B, S, E)`` → ``(B, H, S, E / H)``."""
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)


def _in_projections(rec: Recorder, a: dict[str, Any], E: int) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` projected as in ``_in_projection(_packed)``, batch at the engine's batch dim."""
    query, key, value = a["query"], a["key"], a["value"]
    bd = rec.site.batch_dim

    def layout(t: Tensor) -> Tensor:  # (S, B, ·) → batch at the engine's batch dim
        return t.transpose(0, 1) if bd == 0 else t

    xq = layout(query)
    xk = xq if key is query else layout(key)
    xv = xk if value is key else layout(value)
    w, bias = a["in_proj_weight"], a["in_proj_bias"]
    thirds = (slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E))
    if a["use_separate_proj_weight"]:
        rows: tuple[slice | None, ...] = thirds if bias is not None else (None, None, None)
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        q, k, v = (project(rec, x, a[n], bias, None, r)
                   for x, n, r in zip((xq, xk, xv), names, rows, strict=True))
        return q, k, v
    if key is not value and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if query is key and key is value:  # self-attention: the packed weight at once
        q, k, v = project(rec, xq, w, bias).unflatten(-1, (3, E)).unbind(-2)
    elif key is value:  # encoder-decoder attention: rows [0, E) and [E, 3E)
        q = project(rec, xq, w, bias, thirds[0], thirds[0])
        rest = slice(E, 3 * E)
        k, v = project(rec, xk, w, bias, rest, rest).unflatten(-1, (2, E)).unbind(-2)
    else:
        q, k, v = (project(rec, x, w, bias, r, r) for x, r in zip((xq, xk, xv), thirds, strict=True))
    return q, k, v


def _extend_keys(rec: Recorder, a: dict[str, Any], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
    """``bias_k``/``bias_v``, ``static_k``/``static_v`` and ``add_zero_attn`` on ``(B, H, S, hd)`` keys and values.

    Returns:
        The keys, the values and the number of key positions appended.
    """
    B, H, _, hd = k.shape
    extra = 0
    if a["bias_k"] is not None and a["bias_v"] is not None:
        if a["static_k"] is not None or a["static_v"] is not None:
            raise AssertionError("bias cannot be added to static key or value.")
        k = torch.cat([k, _split(per_example_copy(rec, a["bias_k"], B), H)], 2)
        v = torch.cat([v, _split(per_example_copy(rec, a["bias_v"], B), H)], 2)
        extra += 1
    elif a["bias_k"] is not None or a["bias_v"] is not None:
        raise AssertionError("bias_k and bias_v must be both set or both None")
    for name in ("static_k", "static_v"):
        st = a[name]
        if st is not None:
            if st.shape[0] != B * H or st.shape[2] != hd:
                raise AssertionError(f"expecting {name} of shape ({B * H}, S, {hd}), got {tuple(st.shape)}")
            if name == "static_k":
                k = st.reshape(B, H, -1, hd)
            else:
                v = st.reshape(B, H, -1, hd)
    if a["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
        extra += 1
    return k, v, extra


def _mask(
    a: dict[str, Any], L: int, S: int, src: int, extra: int, B: int, H: int, dtype: torch.dtype
) -> tuple[Tensor | None, bool]:
    """The additive mask broadcastable to ``(B, H, L, src)`` and the ``is_causal`` flag for SDPA."""
    kpm = float_mask(a["key_padding_mask"], dtype, "key_padding_mask")
    mask, is_causal = a["attn_mask"], bool(a["is_causal"])
    if is_causal and mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and kpm is None and not a["need_weights"]:
        return None, True
    mask = float_mask(mask, dtype, "attn_mask")
    if mask is not None:
        want = (L, S) if mask.dim() == 2 else (B * H, L, S)
        if tuple(mask.shape) != want:
            raise RuntimeError(f"The shape of the {mask.dim()}D attn_mask is {mask.shape}, but should be {want}.")
        mask = mask.reshape(B, H, L, S) if mask.dim() == 3 else mask.reshape(1, 1, L, S)
        mask = F.pad(mask, (0, extra)) if extra else mask
    if kpm is not None:
        kpm = F.pad(kpm, (0, extra)) if extra else kpm
        if tuple(kpm.shape) != (B, src):
            raise AssertionError(f"Expected key_padding_mask of shape {(B, src - extra)}, "
                                 f"got {tuple(a['key_padding_mask'].shape)}")
        kpm = kpm.reshape(B, 1, 1, src)
        mask, is_causal = (kpm if mask is None else mask + kpm), False
    return mask, is_causal
