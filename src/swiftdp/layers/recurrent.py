"""Recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (``torch.lstm`` / ``gru`` / ``rnn_*``).

The modules train unchanged. Their forward calls one fused op with every
weight in a list; the rule runs that op with the weights detached (output
and input gradient as usual) and, in the backward, recovers each step's
gate pre-activation gradients by recomputing the stack unrolled in Python on
detached inputs and pulling the received output gradients (``output``,
``h_n``, ``c_n``) back to the gates with ``torch.autograd.grad``. Then, per
layer and direction, with ``δᵢ_t`` the gradient of ``x_t W_ihᵀ + b_ih`` and
``δʰ_t`` that of ``h_{t-1} W_hhᵀ + b_hh``:

* ``W_ih``: ``G_i = Σ_t δᵢ_tᵀ x_t`` — a linear use over time (ghost or
  instantiated by the cost model);
* ``W_hh``: ``G_i = Σ_t δʰ_tᵀ h_{t-1}``; ``b_ih``: ``Σ_t δᵢ_t``; ``b_hh``:
  ``Σ_t δʰ_t``;
* ``W_hr`` (LSTM ``proj_size``): ``G_i = Σ_t (∂L/∂h_t)ᵀ (o_t ⊙ tanh c_t)``.

For LSTM and the plain RNN ``δʰ = δᵢ``; for the GRU the candidate gate is
``n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn))``, so ``δʰ_n = r ⊙ δᵢ_n``.

Packed sequences are supported (steps past an example's length leave its
state unchanged and get zero gradient), and so is dropout between layers in
training: the stack then runs layer by layer with dropout masks the rule
draws itself and reuses in the recomputation.

References:
    Hochreiter, Schmidhuber. Long short-term memory. 1997. Cho et al.
    Learning phrase representations using RNN encoder-decoder. 2014.
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from swiftdp.clipping.contributions import Contribution, LinearFactors, PerSampleGrads
from swiftdp.errors import UnsupportedModuleError
from swiftdp.layers.registry import bind, register

if TYPE_CHECKING:
    from swiftdp.clipping.tracer import Tracer

_KINDS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "tanh", torch.rnn_relu: "relu"}
_PADDED = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
           "bidirectional", "batch_first")
_PACKED = ("input", "batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout",
           "train", "bidirectional")


@dataclass
class _Call:
    """A parsed call of a fused recurrent op."""

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

    @property
    def stride(self) -> int:
        return len(self.params) // (self.layers * self.dirs)

    def weights(self, layer: int, d: int) -> dict[str, Tensor | None]:
        """``w_ih, w_hh, b_ih, b_hh, w_hr`` of one layer and direction (absent: ``None``)."""
        k = (layer * self.dirs + d) * self.stride
        p = self.params[k:k + self.stride]
        b = self.has_biases
        return {"w_ih": p[0], "w_hh": p[1], "b_ih": p[2] if b else None,
                "b_hh": p[3] if b else None,
                "w_hr": p[4 if b else 2] if len(p) > (4 if b else 2) else None}


def _parse(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    packed = len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 1
    a = bind(_PACKED if packed else _PADDED, args, kwargs, {"batch_first": False})
    hx = a["hx"]
    return _Call(
        kind=_KINDS[func], x=a["input"], batch_sizes=a["batch_sizes"] if packed else None,
        hx=tuple(hx) if isinstance(hx, (tuple, list)) else (hx,), params=list(a["params"]),
        has_biases=bool(a["has_biases"]), layers=int(a["num_layers"]),
        dropout=float(a["dropout"]), train=bool(a["train"]),
        dirs=2 if a["bidirectional"] else 1, batch_first=bool(a["batch_first"]) and not packed,
    )


def _run(func: Any, c: _Call, x: Tensor, hx: tuple[Tensor, ...], params: list[Tensor], layers: int,
         dropout: float) -> tuple[Tensor, ...]:
    h: Any = hx if c.kind == "lstm" else hx[0]
    if c.batch_sizes is not None:
        return func(x, c.batch_sizes, h, params, c.has_biases, layers, dropout, c.train, c.dirs == 2)
    return func(x, h, params, c.has_biases, layers, dropout, c.train, c.dirs == 2, c.batch_first)


def _forward(func: Any, c: _Call, params: list[Tensor]) -> tuple[tuple[Tensor, ...], list[Tensor]]:
    """The fused op on detached weights; layer by layer with own masks under dropout."""
    if not (c.dropout > 0 and c.train and c.layers > 1):
        return _run(func, c, c.x, c.hx, params, c.layers, c.dropout), []
    n, D = c.stride * c.dirs, c.dirs
    x, states, masks = c.x, [], []
    for layer in range(c.layers):
        res = _run(func, c, x, tuple(h[layer * D:(layer + 1) * D] for h in c.hx),
                   params[layer * n:(layer + 1) * n], 1, 0.0)
        states.append(res[1:])
        x = res[0]
        if layer < c.layers - 1:  # as ATen's CPU dropout: bernoulli(1 - p) / (1 - p)
            mask = torch.zeros_like(x) if c.dropout >= 1 else (
                torch.empty_like(x).bernoulli_(1 - c.dropout).div_(1 - c.dropout))
            masks.append(mask)
            x = x * mask
    return (x, *(torch.cat(s, 0) for s in zip(*states, strict=True))), masks


def _unsorted_indices(tr: Tracer) -> Tensor | None:
    """The permutation back to the caller's batch order of a module's packed input."""
    if tr.stack and isinstance(tr.stack[-1].module, nn.RNNBase):
        call = tr.stack[-1]
        inp = call.args[0] if call.args else call.kwargs.get("input")
        if isinstance(inp, PackedSequence):
            return inp.unsorted_indices
    return None


@register(torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)
def rnn_rule(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Rule for the fused recurrent ops behind ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

    Raises:
        UnsupportedModuleError: the batch of the recurrent input is not the
            engine's batch.
    """
    c = _parse(func, args, kwargs)
    B = c.hx[0].shape[1]
    if B != tr.batch_size:
        where = "the packed input" if c.batch_sizes is not None else (
            f"the input of shape {tuple(c.x.shape)} (batch_first={c.batch_first})")
        raise UnsupportedModuleError(
            f"In module `{tr.module_path()}`, {where} of the recurrent layer has {B} sequences, "
            f"but the batch has {tr.batch_size} examples. Give the layer the whole batch "
            "(batch_first as set on the module; GradClipper's batch_first must match the "
            "layout of the model's inputs), with one sequence per example."
        )
    trainable = [p for p in c.params if tr.is_trainable(p)]
    det = [p.detach() if tr.is_trainable(p) else p for p in c.params]
    masks: list[Tensor] = []
    unsorted = _unsorted_indices(tr) if c.batch_sizes is not None else None

    def compute() -> tuple[Tensor, ...]:
        out, m = _forward(func, c, det)
        masks.extend(m)
        return out

    def build(grads: list[Tensor | None]) -> list[Contribution]:
        if all(g is None for g in grads):
            return []
        with torch.enable_grad():
            return _contributions(tr, c, det, masks, grads, unsorted)

    return tr.track(compute, [c.x, *c.hx], trainable, build)


def _time_major(c: _Call, t: Tensor, valid: Tensor | None) -> Tensor:
    """A padded or packed ``(…, f)`` sequence tensor as time-major padded ``(T, B, f)``."""
    if valid is not None:
        out = t.new_zeros(*valid.shape, t.shape[-1])
        out[valid] = t
        return out
    return t.transpose(0, 1) if c.batch_first else t


@dataclass
class _Trace:
    """What the unrolled recomputation of one layer and direction keeps."""

    x: Tensor  # layer input (T, B, in), detached
    xw: Tensor  # x W_ihᵀ + b_ih (T, B, G): the input-gate pre-activations
    prev: list[Tensor]  # h_{t-1} by time index
    resets: list[Tensor]  # GRU reset gates by time index
    hr: list[Tensor]  # LSTM o ⊙ tanh(c) by time index (projection input)
    hp: list[Tensor]  # LSTM projected h_t by time index (projection output)


def _layer(c: _Call, w: dict[str, Tensor | None], x: Tensor, xw: Tensor, h: Tensor,
           cell: Tensor | None, d: int, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, _Trace]:
    """One direction of one layer, unrolled over time; returns (outputs, h_T, c_T, trace)."""
    T = x.shape[0]
    w_hh, b_hh, w_hr = w["w_hh"], w["b_hh"], w["w_hr"]
    assert w_hh is not None
    tr_ = _Trace(x, xw, [h] * T, [], [], [])
    outs: list[Tensor] = [h] * T
    resets: list[Tensor] = [h] * T
    hr_l: list[Tensor] = [h] * T
    hp_l: list[Tensor] = [h] * T
    for t in range(T) if d == 0 else range(T - 1, -1, -1):
        tr_.prev[t] = h
        gh = F.linear(h, w_hh, b_hh)
        c_new: Tensor | None = None
        if c.kind == "lstm":
            assert cell is not None
            i, f, g, o = (xw[t] + gh).chunk(4, 1)
            c_new = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hr = torch.sigmoid(o) * torch.tanh(c_new)
            hr_l[t] = hr
            h_new = hr if w_hr is None else F.linear(hr, w_hr)
            hp_l[t] = h_new
        elif c.kind == "gru":
            H = h.shape[1]
            xr, xz, xn = xw[t].split(H, 1)
            hr_, hz, hn = gh.split(H, 1)
            r = torch.sigmoid(xr + hr_)
            resets[t] = r.detach()
            n = torch.tanh(xn + r * hn)
            h_new = n + torch.sigmoid(xz + hz) * (h - n)
        else:
            pre = xw[t] + gh
            h_new = torch.tanh(pre) if c.kind == "tanh" else torch.relu(pre)
        if valid is None:
            h, cell, outs[t] = h_new, c_new, h_new
        else:
            m = valid[t].unsqueeze(1)
            h = torch.where(m, h_new, h)
            if c_new is not None and cell is not None:
                cell = torch.where(m, c_new, cell)
            outs[t] = torch.where(m, h_new, torch.zeros_like(h_new))
    tr_.resets, tr_.hr, tr_.hp = resets, hr_l, hp_l
    return torch.stack(outs), h, cell, tr_


def _contributions(
    tr: Tracer, c: _Call, det: list[Tensor], masks: list[Tensor], grads: list[Tensor | None],
    unsorted: Tensor | None,
) -> list[Contribution]:
    """Recompute the stack unrolled and turn the gate gradients into contributions."""
    valid = None
    if c.batch_sizes is not None:
        bs = c.batch_sizes.to(c.x.device)
        valid = torch.arange(int(bs[0]) if bs.numel() else 0, device=bs.device).unsqueeze(0) < bs.unsqueeze(1)
    dc = _Call(**{**c.__dict__, "params": det})
    D = c.dirs
    hx = [h.detach() for h in c.hx]
    x = _time_major(c, c.x.detach(), valid)
    traces: list[tuple[dict[str, Tensor | None], dict[str, Tensor | None], _Trace]] = []
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(c.layers):
        outs = []
        for d in range(D):
            w = dc.weights(layer, d)
            assert w["w_ih"] is not None
            xw = F.linear(x, w["w_ih"], w["b_ih"])
            if layer == 0:
                xw = xw.detach().requires_grad_()
            k = layer * D + d
            out, h_last, c_last, trace = _layer(
                c, w, x, xw, hx[0][k], hx[1][k] if c.kind == "lstm" else None, d, valid)
            outs.append(out)
            h_n.append(h_last)
            if c_last is not None:
                c_n.append(c_last)
            traces.append((w, c.weights(layer, d), trace))
        x = torch.cat(outs, -1) if D > 1 else outs[0]
        if layer < len(masks):
            x = x * _time_major(c, masks[layer], valid)
    finals = [x, torch.stack(h_n), torch.stack(c_n) if c_n else None]
    outputs, cots = [], []
    for i, (o, g) in enumerate(zip(finals, grads, strict=False)):
        if g is not None and o is not None:
            outputs.append(o)
            cots.append(_time_major(c, g, valid) if i == 0 else g)
    proj = c.kind == "lstm" and traces[0][0]["w_hr"] is not None
    inputs = [t.xw for _, _, t in traces]
    if proj:
        inputs += [hp for _, _, t in traces for hp in t.hp]
    res = torch.autograd.grad(outputs, inputs, cots, allow_unused=True)
    res = [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res, strict=True)]
    T = x.shape[0]
    contribs: list[Contribution] = []
    for j, (wd, wp, t) in enumerate(traces):
        dgi = res[j].detach()
        dgh = dgi
        if c.kind == "gru":
            H = dgi.shape[-1] // 3
            dgh = torch.cat([dgi[..., :2 * H], torch.stack(t.resets) * dgi[..., 2 * H:]], -1)
        factors = {
            "w_ih": (t.x, dgi), "w_hh": (torch.stack(t.prev).detach(), dgh),
            "b_ih": (None, dgi), "b_hh": (None, dgh),
        }
        if proj:
            dh = torch.stack(res[len(traces) + j * T:len(traces) + (j + 1) * T])
            factors["w_hr"] = (torch.stack(t.hr).detach(), dh)
        for name, (a, g) in factors.items():
            p = wp[name]
            if p is None or not tr.is_trainable(p):
                continue
            g = g.transpose(0, 1)
            if unsorted is not None:
                g = g.index_select(0, unsorted.to(g.device))
            if a is None:
                contribs.append(PerSampleGrads(p, g.sum(1)))
                continue
            a = a.transpose(0, 1)
            if unsorted is not None:
                a = a.index_select(0, unsorted.to(a.device))
            contribs.append(LinearFactors(p, a, g, ghost=tr.prefer_ghost(T, a.shape[2], g.shape[2])))
    return contribs
