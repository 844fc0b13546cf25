"""Recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (``torch.lstm`` / ``gru`` / ``rnn_*``).

The modules train unchanged. Their forward calls one fused op with every
weight in a list. The rule runs that op layer by layer with the weights
detached, each layer inside an autograd function whose backward is a lean
backpropagation through time: the gate activations are recomputed at once
from the layer's inputs and outputs (``h_{t-1}`` is the output at the
previous step), only the recurrence ``∂L/∂h_{t-1} = δʰ_t W_hh + …`` runs as
a Python loop over time, and the same pass yields the input gradients and,
per layer and direction, with ``δᵢ_t`` the gradient of ``x_t W_ihᵀ + b_ih``
and ``δʰ_t`` that of ``h_{t-1} W_hhᵀ + b_hh``:

* ``W_ih``: ``G_i = Σ_t δᵢ_tᵀ x_t`` — a linear use over time (ghost or
  instantiated by the cost model);
* ``W_hh``: ``G_i = Σ_t δʰ_tᵀ h_{t-1}``; ``b_ih``: ``Σ_t δᵢ_t``; ``b_hh``:
  ``Σ_t δʰ_t``;
* ``W_hr`` (LSTM ``proj_size``): ``G_i = Σ_t (∂L/∂h_t)ᵀ (o_t ⊙ tanh c_t)``.

For LSTM and the plain RNN ``δʰ = δᵢ``; for the GRU the candidate gate is
``n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn))``, so ``δʰ_n = r ⊙ δᵢ_n``
(``b_hn``'s gradient differs from ``b_in``'s).

Packed sequences are supported: steps past an example's length leave its
state unchanged and get zero gradient, and the per-example gradients are put
back in the caller's batch order. Dropout between layers (training) uses
masks drawn as the stock CPU kernel draws them. The batch is never looped over.

References:
    Hochreiter, Schmidhuber. Long short-term memory. 1997. Cho et al.
    Learning phrase representations using RNN encoder-decoder. 2014.
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.utils.rnn import PackedSequence

from swiftdp.clipping.contributions import (
    Contribution,
    LinearFactors,
    PerSampleGrads,
    compute_dtype,
)
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers._common import bind

if TYPE_CHECKING:
    from swiftdp.clipping.contract import Policy, Recorder, Site

_KINDS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "tanh", torch.rnn_relu: "relu"}
_PADDED = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
           "bidirectional", "batch_first")
_PACKED = ("input", "batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout",
           "train", "bidirectional")
_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
Factors = dict[str, tuple[Tensor | None, Tensor]]  # name → (activation or None, gradient), time-major


@dataclass
class _Call:
    """A parsed call of a fused recurrent op."""

    func: Any
    kind: str
    x: Tensor  # padded (B, T, in) / (T, B, in), or packed data (N, in)
    batch_sizes: Tensor | None
    hx: tuple[Tensor, ...]  # (h0,) or (h0, c0), each (L·D, B, ·)
    params: list[Tensor]
    has_biases: bool
    layers: int
    dropout: float
    train: bool
    dirs: int
    batch_first: bool

    def weights(self, layer: int, d: int, params: list[Tensor] | None = None) -> dict[str, Tensor | None]:
        """``w_ih, w_hh, b_ih, b_hh, w_hr`` of one layer and direction (absent: ``None``)."""
        ps = self.params if params is None else params
        stride = len(ps) // (self.layers * self.dirs)
        p: list[Tensor | None] = list(ps[(layer * self.dirs + d) * stride:(layer * self.dirs + d + 1) * stride])
        if not self.has_biases:
            p = [p[0], p[1], None, None, *p[2:]]
        return dict(zip(_NAMES, [*p, None][:5], strict=True))


def _parse(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    packed = len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 1
    a = bind(_PACKED if packed else _PADDED, args, kwargs, {"batch_first": False})
    hx = a["hx"]
    return _Call(
        func=func, kind=_KINDS[func], x=a["input"], batch_sizes=a["batch_sizes"] if packed else None,
        hx=tuple(hx) if isinstance(hx, (tuple, list)) else (hx,), params=list(a["params"]),
        has_biases=bool(a["has_biases"]), layers=int(a["num_layers"]),
        dropout=float(a["dropout"]), train=bool(a["train"]),
        dirs=2 if a["bidirectional"] else 1, batch_first=bool(a["batch_first"]) and not packed,
    )


def _unsorted_indices(rec: Recorder) -> Tensor | None:
    """The permutation back to the caller's batch order of a module's packed input."""
    site = rec.site
    if isinstance(site.module, nn.RNNBase):
        inp = site.module_args[0] if site.module_args else site.module_kwargs.get("input")
        if isinstance(inp, PackedSequence):
            return inp.unsorted_indices
    return None


def _time_major(c: _Call, t: Tensor, valid: Tensor | None) -> Tensor:
    """A padded or packed ``(…, f)`` sequence tensor as time-major padded ``(T, B, f)``."""
    if valid is not None:
        out = t.new_zeros(*valid.shape, t.shape[-1])
        out[valid] = t
        return out
    return t.transpose(0, 1) if c.batch_first else t


def _native(c: _Call, t: Tensor, valid: Tensor | None) -> Tensor:
    """Inverse of :func:`_time_major`: back to the op's own layout."""
    if valid is not None:
        return t[valid]
    return t.transpose(0, 1) if c.batch_first else t


def rnn_rule(rec: Recorder, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for the fused recurrent ops behind ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

    Raises:
        UnsupportedModuleError: the batch of the recurrent input is not the
            engine's batch.
    """
    c = _parse(func, args, kwargs)
    B = c.hx[0].shape[1]
    if B != rec.site.batch_size:
        where = "the packed input" if c.batch_sizes is not None else (
            f"the input of shape {tuple(c.x.shape)} (batch_first={c.batch_first})")
        raise UnsupportedModuleError(
            f"In module `{rec.site.module_path}`, {where} of the recurrent layer has {B} sequences, "
            f"but the batch has {rec.site.batch_size} examples. Give the layer the whole batch "
            "(batch_first as set on the module; GradClipper's batch_first must match the "
            "layout of the model's inputs), with one sequence per example."
        )
    valid = None  # (T, B): whether step t exists for (sorted) sequence b
    if c.batch_sizes is not None:
        bs = c.batch_sizes.to(c.x.device)
        valid = torch.arange(B, device=bs.device).unsqueeze(0) < bs.unsqueeze(1)
    unsorted = _unsorted_indices(rec) if c.batch_sizes is not None else None
    det = [p.detach() if rec.site.is_trainable(p) else p for p in c.params]
    drop = c.dropout if c.train and c.layers > 1 else 0.0
    x, D = c.x, c.dirs
    states: list[tuple[Tensor, ...]] = []
    for layer in range(c.layers):
        spec = _Spec(c, layer, det, valid)
        mine = [p for d in range(D) for p in c.weights(layer, d).values()
                if p is not None and rec.site.is_trainable(p)]
        # A scalar probe whose gradient arrives right after the layer's backward.
        zero = partial(torch.zeros, (), dtype=x.dtype, device=x.device)
        probe = rec.track(zero, [], mine, _builder(rec.site, spec, unsorted))
        hx = [h[layer * D:(layer + 1) * D] for h in c.hx]
        res = _Layer.apply(spec, probe, x, *hx)
        states.append(res[1:])
        x = res[0]
        if drop > 0 and layer < c.layers - 1:
            x = x * _dropout_mask(x, drop)
    return (x, *(torch.cat(s, 0) for s in zip(*states, strict=True)))


def _dropout_mask(x: Tensor, p: float) -> Tensor:
    """``bernoulli(1 - p) / (1 - p)`` on the layer output's own layout, as ATen's CPU kernel."""
    if p >= 1:
        return torch.zeros_like(x)
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


@dataclass
class _Spec:
    """One layer (all directions) of a recurrent call; ``stash`` holds its last backward's factors."""

    call: _Call
    layer: int
    det: list[Tensor]
    valid: Tensor | None
    stash: list[Factors] | None = field(default=None)


def _builder(site: Site, spec: _Spec, unsorted: Tensor | None) -> Any:
    def build(grads: Sequence[Tensor | None], policy: Policy) -> list[Contribution]:
        stash, spec.stash = spec.stash, None
        if grads[0] is None or stash is None:
            return []
        out: list[Contribution] = []
        # The weights of a direction share their gate gradients (the LSTM's
        # b_ih and b_hh the same sum): each is reordered and summed once.
        major: dict[int, Tensor] = {}
        sums: dict[int, Tensor] = {}
        for d, factors in enumerate(stash):
            w = spec.call.weights(spec.layer, d)
            for name, (a, g_tm) in factors.items():
                p = w[name]
                if p is None or not site.is_trainable(p):
                    continue
                key = id(g_tm)
                if key not in major:
                    major[key] = _batch_major(g_tm, unsorted)
                g = major[key]
                if a is None:
                    if key not in sums:
                        sums[key] = g.sum(1)
                    out.append(PerSampleGrads(p, sums[key]))
                else:
                    a = _batch_major(a, unsorted)
                    out.append(LinearFactors(p, a, g, ghost=policy.factored(a.shape[1], a.shape[2], g.shape[2])))
        return out

    return build


def _batch_major(t: Tensor, unsorted: Tensor | None) -> Tensor:
    """``(T, B, f)`` → ``(B, T, f)`` in the caller's batch order."""
    t = t.transpose(0, 1)
    return t if unsorted is None else t.index_select(0, unsorted.to(t.device))


class _Layer(Function):
    """One layer of the fused op (weights detached); backward: BPTT that also fills ``spec.stash``."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, probe: Tensor, x: Tensor, *hx: Tensor) -> Any:  # type: ignore[override]
        c, D = spec.call, spec.call.dirs
        params = [p for d in range(D) for p in c.weights(spec.layer, d, spec.det).values() if p is not None]
        h: Any = tuple(hx) if c.kind == "lstm" else hx[0]
        if c.batch_sizes is not None:
            out = c.func(x, c.batch_sizes, h, params, c.has_biases, 1, 0.0, c.train, D == 2)
        else:
            out = c.func(x, h, params, c.has_biases, 1, 0.0, c.train, D == 2, c.batch_first)
        ctx.spec = spec
        ctx.save_for_backward(x, out[0], *hx)
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dh_n: Tensor, dc_n: Tensor | None = None) -> Any:  # type: ignore[override]
        spec: _Spec = ctx.spec
        c, valid, D = spec.call, spec.valid, spec.call.dirs
        x, out, *hx = ctx.saved_tensors
        ws = [c.weights(spec.layer, d, spec.det) for d in range(D)]
        # One dtype, at least float32, for the whole BPTT: under autocast the saved
        # input and outputs are bf16/fp16 while the weights are float32.
        dt = compute_dtype(x, out, *(w for wd in ws for w in wd.values() if w is not None))
        with torch.autocast(x.device.type, enabled=False):
            X, Y, dY = (_time_major(c, t.to(dt), valid) for t in (x, out, dout))
            h0s, dhs = [h.to(dt) for h in hx], dh_n.to(dt)
            dcs = None if dc_n is None else dc_n.to(dt)
            hp = Y.shape[-1] // D
            dx = torch.zeros_like(X) if ctx.needs_input_grad[2] else None
            stash, dh0, dc0 = [], [], []
            for d in range(D):
                w = {k: None if v is None else v.to(dt) for k, v in ws[d].items()}
                sl = slice(d * hp, (d + 1) * hp)
                res = _bptt(c.kind, w, X, Y[..., sl], dY[..., sl], h0s[0][d], dhs[d],
                            h0s[1][d] if c.kind == "lstm" else None,
                            dcs[d] if dcs is not None else None, d, valid)
                stash.append(res[0])
                dh0.append(res[1])
                if res[2] is not None:
                    dc0.append(res[2])
                if dx is not None:
                    w_ih = w["w_ih"]
                    assert w_ih is not None
                    dx += res[0]["w_ih"][1] @ w_ih
        spec.stash = stash
        grads_hx = [torch.stack(g).to(h.dtype)
                    for g, h in zip([dh0, *([dc0] if dc0 else [])], hx, strict=True)]
        dx_native = None if dx is None else _native(c, dx, valid).to(x.dtype)
        return (None, x.new_zeros(()), dx_native, *grads_hx)


def _bptt(
    kind: str, w: dict[str, Tensor | None], X: Tensor, Y: Tensor, dY: Tensor, h0: Tensor,
    dh_n: Tensor, c0: Tensor | None, dc_n: Tensor | None, d: int, valid: Tensor | None,
) -> tuple[Factors, Tensor, Tensor | None]:
    """Backpropagation through time for one direction of one layer (time-major tensors).

    Returns:
        The factors of every weight, ``∂L/∂h_0`` and ``∂L/∂c_0`` (LSTM).
    """
    w_ih, w_hh, b_ih, b_hh = (w[k] for k in _NAMES[:4])
    assert w_ih is not None and w_hh is not None
    T = X.shape[0]
    order = range(T) if d == 0 else range(T - 1, -1, -1)
    m = None if valid is None else valid.unsqueeze(-1).to(X.dtype)  # (T, B, 1)
    if d == 0:  # h_{t-1} as step t saw it (h_0 at the first valid step)
        prev = torch.cat([h0.unsqueeze(0), Y[:-1]])
    else:
        prev = torch.cat([Y[1:], h0.unsqueeze(0)])
        if valid is not None:
            nxt = torch.cat([valid[1:], valid.new_zeros(1, valid.shape[1])]).unsqueeze(-1)
            prev = torch.where(nxt, prev, h0)
    if kind == "lstm":
        assert c0 is not None
        return _lstm(X, dY, prev, w, c0, dh_n, dc_n, d, m)
    xw = F.linear(X, w_ih, b_ih)
    gh = F.linear(prev, w_hh, b_hh)
    dh = dh_n
    if kind == "gru":
        H = h0.shape[-1]
        xr, xz, xn = xw.split(H, -1)
        hr, hz, hn = gh.split(H, -1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        k_n = (1 - z) * (1 - n * n)
        k_r = k_n * hn * r * (1 - r)
        k_z = (prev - n) * z * (1 - z)
        k_h = torch.cat([k_r, k_z, k_n * r], -1)  # δʰ = ∂L/∂h_new ⊙ k_h
        dhs = torch.empty_like(Y)
        for t in reversed(order):
            mt = None if m is None else m[t]
            dh_new = dY[t] + (dh if mt is None else mt * dh)
            dhs[t] = dh_new
            nxt = torch.addcmul((dh_new.repeat(1, 3) * k_h[t]) @ w_hh, dh_new, z[t])
            dh = nxt if mt is None else torch.addcmul(nxt, 1 - mt, dh)
        dhs3 = dhs.repeat(1, 1, 3)
        dgi, dgh = dhs3 * torch.cat([k_r, k_z, k_n], -1), dhs3 * k_h
        return {"w_ih": (X, dgi), "w_hh": (prev, dgh), "b_ih": (None, dgi), "b_hh": (None, dgh)}, dh, None
    pre = xw + gh
    act = pre.tanh() if kind == "tanh" else pre.relu()
    k = 1 - act * act if kind == "tanh" else (pre > 0).to(pre.dtype)
    dp = torch.empty_like(Y)
    for t in reversed(order):
        mt = None if m is None else m[t]
        dh_new = dY[t] + (dh if mt is None else mt * dh)
        torch.mul(dh_new, k[t], out=dp[t])
        dh = dp[t] @ w_hh if mt is None else torch.addcmul(dp[t] @ w_hh, 1 - mt, dh)
    return {"w_ih": (X, dp), "w_hh": (prev, dp), "b_ih": (None, dp), "b_hh": (None, dp)}, dh, None


def _sigmoid_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    """``σ(z)`` in place of ``z`` and its slope ``σ(1 − σ)``."""
    s = z.sigmoid_()
    return s, torch.addcmul(s, s, s, value=-1)


def _lstm(
    X: Tensor, dY: Tensor, prev: Tensor, w: dict[str, Tensor | None], c0: Tensor,
    dh_n: Tensor, dc_n: Tensor | None, d: int, m: Tensor | None,
) -> tuple[Factors, Tensor, Tensor]:
    """LSTM BPTT: gates recomputed at once, then the cell state forward and the recurrence back.

    With the four gates' pre-activations ``z = (i, f, g, o)`` and ``s = σ(z)``
    (``g`` through ``tanh``), the gradient of ``z_t`` is ``K_t ⊙ (dc, dc, dc, dh)``
    where ``K = (g σ'_i, c_{t-1} σ'_f, i tanh'_g, tanh c_t σ'_o)`` is formed
    once for all steps; each step of the loop is then one multiply-add for
    ``∂L/∂c_t``, two multiplies for ``δ_t``, one ``addmm`` for
    ``∂L/∂h_{t-1} = ∂L/∂y_{t-1} + δ_t W_hh`` and one multiply for the carry.

    ``g`` and ``tanh c`` are formed by ``tanh``, not as ``2σ(2x) − 1`` (which
    the CPU computes several times faster): that form loses relative accuracy
    for small ``x`` (about ``u / |x|``), which would reach the factors of
    ``w_hr`` and of the ``i`` and ``o`` gates.
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = (w[k] for k in _NAMES)
    assert w_ih is not None and w_hh is not None
    T, B = X.shape[:2]
    H = c0.shape[-1]
    order = range(T) if d == 0 else range(T - 1, -1, -1)
    bias = b_ih if b_hh is None else b_hh if b_ih is None else b_ih + b_hh
    z = F.linear(X, w_ih, bias)
    z.view(T * B, 4 * H).addmm_(prev.reshape(T * B, prev.shape[-1]), w_hh.t())
    z4 = z.view(T, B, 4, H)
    g = z4[:, :, 2].tanh()
    s4, ds4 = (t.view(T, B, 4, H) for t in _sigmoid_and_slope(z))
    i, f, o = s4[:, :, 0], s4[:, :, 1], s4[:, :, 3]
    # The cell state, forward: C_t = f_t c_{t-1} + i_t g_t; ``cells`` holds the
    # state carried past step t (unchanged past an example's length).
    ig = i * g
    C = torch.empty_like(g)
    cells = C if m is None else torch.empty_like(g)
    igs, fs, Cs, cs = ig.unbind(0), f.unbind(0), C.unbind(0), cells.unbind(0)
    keep = None if m is None else (m > 0).unbind(0)
    cell = c0
    for t in order:
        torch.addcmul(igs[t], fs[t], cell, out=Cs[t])
        cell = Cs[t] if keep is None else torch.where(keep[t], Cs[t], cell, out=cs[t])
    c_prev = (torch.cat([c0.unsqueeze(0), cells[:-1]]) if d == 0
              else torch.cat([cells[1:], c0.unsqueeze(0)]))
    tc = C.tanh()
    k_c = torch.addcmul(o, o, tc * tc, value=-1)  # o ⊙ tanh'(c) = o (1 − tanh² c)
    K = torch.empty_like(z4)
    torch.mul(g, ds4[:, :, 0], out=K[:, :, 0])
    torch.mul(c_prev, ds4[:, :, 1], out=K[:, :, 1])
    torch.addcmul(i, i, g * g, value=-1, out=K[:, :, 2])  # i ⊙ tanh'(g)
    torch.mul(tc, ds4[:, :, 3], out=K[:, :, 3])
    del z, z4, s4, ds4, ig, C, cells, c_prev
    dg = torch.empty(T, B, 4 * H, dtype=X.dtype, device=X.device)
    dg4 = dg.view(T, B, 4, H)
    dgs, dg3s, dgos = dg.unbind(0), dg4[:, :, :3].unbind(0), dg4[:, :, 3].unbind(0)
    K3s, Kos, kcs, dYs = K[:, :, :3].unbind(0), K[:, :, 3].unbind(0), k_c.unbind(0), dY.unbind(0)
    dhp = torch.empty_like(dY) if w_hr is not None else None
    dc = dc_n if dc_n is not None else torch.zeros_like(c0)
    back = list(reversed(order))
    dh = dh_new = dh_n
    if back:
        dh_new = dYs[back[0]] + (dh_n if m is None else m[back[0]] * dh_n)
    for j, t in enumerate(back):
        mt = None if m is None else m[t]
        if dhp is not None and w_hr is not None:
            dhp[t] = dh_new
            dh_new = dh_new @ w_hr
        dc_new = torch.addcmul(dc if mt is None else mt * dc, dh_new, kcs[t])
        torch.mul(K3s[t], dc_new.unsqueeze(1), out=dg3s[t])
        torch.mul(Kos[t], dh_new, out=dgos[t])
        if mt is None:
            dc = dc_new.mul_(fs[t])
            if j + 1 < T:
                dh_new = torch.addmm(dYs[back[j + 1]], dgs[t], w_hh)
            else:
                dh = dgs[t] @ w_hh
        else:
            assert m is not None
            dh = torch.addcmul(dgs[t] @ w_hh, 1 - mt, dh)
            dc = torch.addcmul(dc_new.mul_(fs[t]), 1 - mt, dc)
            if j + 1 < T:
                nxt = back[j + 1]
                dh_new = dYs[nxt] + m[nxt] * dh
    factors: Factors = {"w_ih": (X, dg), "w_hh": (prev, dg), "b_ih": (None, dg), "b_hh": (None, dg)}
    if dhp is not None:
        factors["w_hr"] = (o * tc, dhp)
    return factors, dh, dc
