"""``swiftdp bench --sweep``: the DP / non-private step time as the work grows.

What is measured. Two blocks, each trained whole by SGD on a fixed synthetic batch:

* ``transformer``: one ``nn.TransformerEncoderLayer`` (pre-norm, batch first,
  ``max(1, d/64)`` heads, feed-forward ``4d``, no dropout) on ``(B, T, d)``
  inputs, mean-pooled over ``T``, a linear head to 10 classes;
* ``conv``: ``relu(x + gn(conv(relu(gn(conv(x))))))``, two 3×3 convolutions of
  ``d`` channels (padding 1, no bias, GroupNorm) on ``(B, d, H, W)`` inputs
  with ``T = H·W`` positions (``H`` the largest divisor of ``T`` at most
  ``√T``: 64 is 8×8, 128 is 8×16), mean-pooled, a linear head.

Each axis (width ``d``, sequence length or positions ``T``, batch ``B``) is
varied with the other two at the centre. At each point four steps run per
round, interleaved in one process (:func:`~swiftdp.bench.timing.interleaved_times`):
non-private SGD on one copy of the block, and swiftdp (:func:`swiftdp.make_private`,
mode ``bk``, σ = 1, C = 1) on another with ``cost_objective`` ``"time"`` (the
shipped choice), ``"ghost"`` and ``"instantiate"`` (that side forced for every
factored layer), the objective switched between steps of the one wrapped copy.

How to read it. ``×`` is a DP step's median over the non-private median.
``chosen`` counts the cost model's per-layer choices (``g``/``i``) and names the
side that carries most of the block's forward flops; ``faster`` is the forced
side with the lower median (``tie`` within 5 %); ``ok`` says the shipped step
is within 5 % of the faster forced one. ``flops ×`` is the ratio that counting
arithmetic predicts: a non-private step is 3 × the forward matmul flops
(attention scores included); DP adds, per factored layer and example,
``2T²(d + p)`` flops on the ghost side and ``4pd`` on the instantiated side
(:func:`~swiftdp.clipping.cost.factored_costs`; either side's ``T p d``
clipped sum replaces the non-private weight gradient, which the DP backward
does not form). Norm layers, biases, the noise and the engine's own work are
left out, so the prediction does not depend on ``B`` and small shapes sit
above it. ``excess`` = measured ``×`` (shipped) / predicted; the growth table
says whether it rises along ``d`` and ``T``, i.e. whether the ratio grows
beyond what the flops predict. Timings on a shared machine are noisy: one
run is one sample.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp.bench.methods import LR, MAX_GRAD_NORM, NOISE_MULTIPLIER
from swiftdp.bench.runner import machine_info
from swiftdp.bench.timing import interleaved_times, median, plan_rounds
from swiftdp.clipping.cost import ModePolicy, factored_costs

BLOCKS: tuple[str, ...] = ("transformer", "conv")
AXES: tuple[str, ...] = ("width", "seq_len", "batch")
OBJECTIVES: tuple[str, ...] = ("time", "ghost", "instantiate")
METHODS: tuple[str, ...] = ("nonprivate", *OBJECTIVES)
CLASSES = 10


@dataclass(frozen=True)
class SweepConfig:
    """The grid and how each point is timed.

    Attributes:
        blocks: from :data:`BLOCKS`.
        centre: ``(d, T, B)`` held while another axis varies.
        widths: values of ``d``.
        seq_lens: values of ``T`` (positions ``H·W`` for the conv block).
        batches: values of ``B``.
        warmup: untimed rounds first (the first DP step also runs swiftdp's
            one-off checks).
        min_rounds: the fewest timed rounds.
        max_rounds: the most timed rounds.
        budget_s: seconds of timed rounds per point (0: always ``max_rounds``).
        max_step_s: a point whose first non-private step takes longer is
            skipped (recorded with the reason).
        threads: torch threads (0: leave torch's setting).
        tie: relative difference under which two medians count as equal.
        seed: model and data seed.
    """

    blocks: tuple[str, ...] = BLOCKS
    centre: tuple[int, int, int] = (256, 128, 16)
    widths: tuple[int, ...] = (128, 256, 512, 1024)
    seq_lens: tuple[int, ...] = (64, 128, 256, 512, 1024)
    batches: tuple[int, ...] = (16, 32, 64, 128, 256)
    warmup: int = 1
    min_rounds: int = 3
    max_rounds: int = 7
    budget_s: float = 6.0
    max_step_s: float = 12.0
    threads: int = 1
    tie: float = 0.05
    seed: int = 0


QUICK = SweepConfig(centre=(16, 16, 4), widths=(8, 16, 32), seq_lens=(4, 16), batches=(2, 4),
                    warmup=1, min_rounds=2, max_rounds=2, budget_s=0.0)


# ------------------------------------------------------------------- blocks
class TransformerBlock(nn.Module):
    """One pre-norm encoder layer on ``(B, T, d)``, mean-pooled, a linear head."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))


class ConvBlock(nn.Module):
    """A residual pair of 3×3 convolutions with GroupNorm on ``(B, d, H, W)``, a linear head."""

    def __init__(self, d: int) -> None:
        super().__init__()
        groups = math.gcd(d, 32)
        self.conv1 = nn.Conv2d(d, d, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, d)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        h = F.relu(x + self.gn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def grid(t: int) -> tuple[int, int]:
    """``(H, W)`` with ``H·W = t`` and ``H`` the largest divisor of ``t`` at most ``√t``."""
    h = math.isqrt(t)
    while t % h:
        h -= 1
    return h, t // h


def build(block: str, d: int) -> nn.Module:
    """A fresh block of width ``d``."""
    return TransformerBlock(d) if block == "transformer" else ConvBlock(d)


def make_batch(block: str, d: int, t: int, b: int, seed: int) -> tuple[Tensor, Tensor]:
    """Synthetic inputs and class labels for ``b`` examples."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, t, d) if block == "transformer" else (b, d, *grid(t))
    return torch.randn(shape, generator=g), torch.randint(0, CLASSES, (b,), generator=g)


# --------------------------------------------------------------- flop model
@dataclass(frozen=True)
class Layer:
    """One factored layer as the layer rule hands it to the cost model.

    Attributes:
        name: the module path.
        kind: ``"linear"`` or ``"conv"`` (:meth:`ModePolicy.factored_conv`).
        seq_len: ``T``, positions per example.
        d_in: ``d`` (a conv: ``C_in · 9``).
        d_out: ``p``.
    """

    name: str
    kind: str
    seq_len: int
    d_in: int
    d_out: int


def layers(block: str, d: int, t: int) -> list[Layer]:
    """The factored layers of a block, with the shapes their rules pass to the cost model."""
    if block == "transformer":
        return [Layer("layer.self_attn.in_proj", "linear", t, d, 3 * d),
                Layer("layer.self_attn.out_proj", "linear", t, d, d),
                Layer("layer.linear1", "linear", t, d, 4 * d),
                Layer("layer.linear2", "linear", t, 4 * d, d),
                Layer("head", "linear", 1, d, CLASSES)]
    return [Layer("conv1", "conv", t, 9 * d, d), Layer("conv2", "conv", t, 9 * d, d),
            Layer("head", "linear", 1, d, CLASSES)]


def choose(layer: Layer, objective: str = "time") -> bool:
    """The engine's choice for ``layer`` in mode ``bk``: ghost (``True``) or instantiate."""
    policy = ModePolicy("bk", objective)
    pick = policy.factored_conv if layer.kind == "conv" else policy.factored
    return pick(layer.seq_len, layer.d_in, layer.d_out)


def forward_flops(block: str, d: int, t: int) -> int:
    """Matmul flops of one example's forward: ``2 T d p`` per layer, plus ``4 T² d`` of attention."""
    total = sum(2 * ly.seq_len * ly.d_in * ly.d_out for ly in layers(block, d, t))
    return total + (4 * t * t * d if block == "transformer" else 0)


def dp_extra_flops(layer: Layer, ghost: bool) -> int:
    """Flops one example's DP step adds for ``layer`` over the non-private step (book-keeping)."""
    g, i = factored_costs(layer.seq_len, layer.d_in, layer.d_out)
    weight_grad = layer.seq_len * layer.d_in * layer.d_out  # formed by the non-private backward
    return 2 * ((g if ghost else i) - weight_grad)


def predicted_ratio(block: str, d: int, t: int, objective: str) -> float:
    """The DP / non-private step ratio that counting flops predicts (independent of ``B``)."""
    base = 3 * forward_flops(block, d, t)
    extra = sum(dp_extra_flops(ly, choose(ly, objective)) for ly in layers(block, d, t))
    return (base + extra) / base


def choice_summary(block: str, d: int, t: int) -> dict[str, Any]:
    """The shipped (``"time"``) choice: per layer, counts, and the side with most forward flops."""
    per_layer = {ly.name: "ghost" if choose(ly) else "instantiate" for ly in layers(block, d, t)}
    weight = {"ghost": 0, "instantiate": 0}
    for ly in layers(block, d, t):
        weight[per_layer[ly.name]] += ly.seq_len * ly.d_in * ly.d_out
    counts = {s: sum(v == s for v in per_layer.values()) for s in weight}
    return {"layers": per_layer, **counts, "dominant": max(weight, key=lambda s: weight[s])}


# ------------------------------------------------------------------ timing
def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def private_steps(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], None]]:
    """One DP step per cost objective on one wrapped ``model`` (as ``bench.methods`` builds it)."""
    from swiftdp.api.private import make_private

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader: DataLoader[Any] = DataLoader(TensorDataset(torch.arange(x.shape[0])),
                                         batch_size=x.shape[0], collate_fn=lambda _: (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False is deliberate
        dp = make_private(model, opt, loader, noise_multiplier=NOISE_MULTIPLIER,
                          max_grad_norm=MAX_GRAD_NORM, mode="bk", seed=0, poisson_sampling=False)
    batches = _forever(dp.data_loader)

    def step_with(objective: str) -> Callable[[], None]:
        def step() -> None:
            dp.clipper.cost_objective = objective  # type: ignore[assignment]
            xb, yb = next(batches)
            dp.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            dp.optimizer.step()
        return step

    return {o: step_with(o) for o in OBJECTIVES}


def nonprivate_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One plain SGD step of ``model`` on ``(x, y)``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def measure_point(cfg: SweepConfig, block: str, d: int, t: int, b: int) -> dict[str, Any]:
    """Time the four methods at one shape; the result holds every timing and the flop model."""
    row: dict[str, Any] = {"block": block, "d": d, "T": t, "B": b, **(
        {"H": grid(t)[0], "W": grid(t)[1]} if block == "conv" else {})}
    row["chosen"] = choice_summary(block, d, t)
    row["predicted"] = {o: predicted_ratio(block, d, t, o) for o in OBJECTIVES}
    row["forward_gflop"] = b * forward_flops(block, d, t) / 1e9
    try:
        torch.manual_seed(cfg.seed)
        plain = build(block, d).train()
        private = copy.deepcopy(plain)
        x, y = make_batch(block, d, t, b, cfg.seed)
        first = nonprivate_step(plain, x, y)
        t0 = time.perf_counter()
        first()
        probe = time.perf_counter() - t0
        if probe > cfg.max_step_s:
            return row | {"status": "skipped", "reason": f"non-private step {probe:.1f} s > "
                                                         f"max_step_s {cfg.max_step_s:g} s"}
        dp = private_steps(private, x, y)
        times = interleaved_times(
            [first, *(dp[o] for o in OBJECTIVES)], warmup=cfg.warmup,
            rounds=lambda s: plan_rounds(s, cfg.budget_s, cfg.min_rounds, cfg.max_rounds))
    except Exception as exc:  # e.g. out of memory: recorded, the sweep goes on
        return row | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400],
                      "traceback": traceback.format_exc(limit=6)}
    ms = {m: 1e3 * median(ts) for m, ts in zip(METHODS, times, strict=True)}
    ratio = {o: ms[o] / ms["nonprivate"] for o in OBJECTIVES}
    g, i = ratio["ghost"], ratio["instantiate"]
    faster = "tie" if abs(g - i) <= cfg.tie * min(g, i) else ("ghost" if g < i else "instantiate")
    return row | {
        "status": "ok", "step_ms": ms, "ratio": ratio, "faster": faster,
        "agrees": faster in ("tie", row["chosen"]["dominant"]),
        "choice_ok": ratio["time"] <= (1 + cfg.tie) * min(g, i),
        "excess": ratio["time"] / row["predicted"]["time"], "rounds": len(times[0]),
        "times_ms": {m: [1e3 * v for v in ts] for m, ts in zip(METHODS, times, strict=True)},
    }


def grid_points(cfg: SweepConfig) -> list[tuple[str, str, int, int, int]]:
    """Every ``(block, axis, d, T, B)`` of the sweep, centre included on each axis."""
    d0, t0, b0 = cfg.centre
    out = []
    for block in cfg.blocks:
        out += [(block, "width", d, t0, b0) for d in cfg.widths]
        out += [(block, "seq_len", d0, t, b0) for t in cfg.seq_lens]
        out += [(block, "batch", d0, t0, b) for b in cfg.batches]
    return out


def run_sweep(cfg: SweepConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every point once (a shape on several axes is measured once and reused)."""
    done: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    rows = []
    for block, axis, d, t, b in grid_points(cfg):
        key = (block, d, t, b)
        reused = key in done
        if not reused:
            start = time.perf_counter()
            done[key] = measure_point(cfg, block, d, t, b)
            if progress:
                r = done[key]
                what = (" ".join(f"{o} {r['ratio'][o]:.2f}x" for o in OBJECTIVES)
                        if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
                print(f"sweep {block:>11} d={d:<5} T={t:<5} B={b:<4} {what} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        rows.append({"axis": axis, "reused": reused, **done[key]})
    return rows


# ------------------------------------------------------------------ report
_AXIS_KEY = {"width": "d", "seq_len": "T", "batch": "B"}


def _f(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], cfg: SweepConfig) -> str:
    """One table per block and axis, the mismatches and the growth check."""
    parts = []
    for block in cfg.blocks:
        for axis in AXES:
            mine = [r for r in rows if r["block"] == block and r["axis"] == axis]
            if not mine:
                continue
            parts.append(f"### {block}, {axis} (d, T, B centre = {cfg.centre})\n")
            parts.append("| d | T | B | non-private ms | × time | × ghost | × instantiate | "
                         "chosen (g/i, dominant) | faster | ok | flops × time / ghost / inst | "
                         "excess | rounds |")
            parts.append("|" + "---|" * 13)
            for r in mine:
                c = r["chosen"]
                pr = " / ".join(f"{r['predicted'][o]:.2f}" for o in OBJECTIVES)
                shape = f"| {r['d']} | {r['T']}" + (f" ({r['H']}×{r['W']})" if "H" in r else "")
                head = f"{shape} | {r['B']} | "
                if r["status"] != "ok":
                    parts.append(head + f"{r['status']}: {r['reason']} |" + " |" * 7
                                 + f" {pr} | | |")
                    continue
                ra = r["ratio"]
                parts.append(
                    head + f"{r['step_ms']['nonprivate']:.1f} | {ra['time']:.2f} | "
                    f"{ra['ghost']:.2f} | {ra['instantiate']:.2f} | "
                    f"{c['ghost']}/{c['instantiate']}, {c['dominant']} | {r['faster']} | "
                    f"{'yes' if r['choice_ok'] else 'NO'} | {pr} | {r['excess']:.2f} | "
                    f"{r['rounds']} |")
            parts.append("")
    measured = [r for r in rows if r["status"] == "ok" and not r["reused"]]

    def line(r: dict[str, Any]) -> str:
        ra = r["ratio"]
        return (f"- {r['block']} d={r['d']} T={r['T']} B={r['B']}: chose "
                f"{r['chosen']['dominant']}, faster {r['faster']} (× time {ra['time']:.2f}, "
                f"ghost {ra['ghost']:.2f}, instantiate {ra['instantiate']:.2f})")

    parts.append("### Choice against the measured optimum\n")
    parts.append("Mismatches (the forced side the cost model did not choose was faster by more "
                 f"than {100 * cfg.tie:.0f} %):\n")
    parts.append("\n".join(line(r) for r in measured if not r["agrees"]) or "- none")
    parts.append("\nSame side as the faster one, yet the shipped step more than "
                 f"{100 * cfg.tie:.0f} % slower than it (the steps differ at most in the pooled "
                 "head: a measure of the noise):\n")
    parts.append("\n".join(line(r) for r in measured if r["agrees"] and not r["choice_ok"])
                 or "- none")
    parts.append("\n### Growth along d and T (excess = measured × time / flops × time)\n")
    parts.append("| block | axis | × time | flops × time | excess | grows beyond flops |")
    parts.append("|---|---|---|---|---|---|")
    for g in growth(rows):
        parts.append(f"| {g['block']} | {g['axis']} | {g['measured']} | {g['predicted']} | "
                     f"{g['excess']} | {g['verdict']} |")
    return "\n".join(parts) + "\n"


def growth(rows: list[dict[str, Any]], tol: float = 0.15) -> list[dict[str, Any]]:
    """Per block along ``width`` and ``seq_len``: the series, and whether the excess rises.

    The excess "grows" when at the largest point it is more than ``1 + tol``
    times its value at the smallest point (one sample each: a single noisy
    point in between does not decide it).
    """
    out = []
    for block in dict.fromkeys(r["block"] for r in rows):
        for axis in ("width", "seq_len"):
            ok = [r for r in rows if r["block"] == block and r["axis"] == axis
                  and r["status"] == "ok"]
            if len(ok) < 2:
                continue
            ex = [r["excess"] for r in ok]
            grows = ex[-1] > (1 + tol) * ex[0]
            out.append({
                "block": block, "axis": axis,
                "measured": " → ".join(f"{r['ratio']['time']:.2f}" for r in ok),
                "predicted": " → ".join(f"{r['predicted']['time']:.2f}" for r in ok),
                "excess": " → ".join(f"{v:.2f}" for v in ex),
                "grows": grows, "verdict": "YES" if grows else "no",
            })
    return out


def write_plot(path: Path, rows: list[dict[str, Any]], cfg: SweepConfig, title: str) -> None:
    """One panel per block × axis: the three DP ratios, the shipped choice marked, flops dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    colours = {"ghost": "tab:blue", "instantiate": "tab:orange", "time": "black"}
    fig, axes = plt.subplots(len(cfg.blocks), len(AXES), squeeze=False,
                             figsize=(4.2 * len(AXES), 3.4 * len(cfg.blocks)))
    for i, block in enumerate(cfg.blocks):
        for j, axis in enumerate(AXES):
            ax = axes[i][j]
            mine = [r for r in rows if r["block"] == block and r["axis"] == axis
                    and r["status"] == "ok"]
            xs = [r[_AXIS_KEY[axis]] for r in mine]
            for o in OBJECTIVES:
                label = "shipped (time)" if o == "time" else f"forced {o}"
                ax.plot(xs, [r["ratio"][o] for r in mine], color=colours[o],
                        lw=2.2 if o == "time" else 1.2, label=label, zorder=3 if o == "time" else 2)
                ax.plot(xs, [r["predicted"][o] for r in mine], color=colours[o], lw=0.8, ls=":")
            for r, x in zip(mine, xs, strict=True):
                side = r["chosen"]["dominant"]
                ax.scatter([x], [r["ratio"]["time"]], s=40, zorder=4, color=colours[side],
                           edgecolors="black", marker="o" if side == "ghost" else "s")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.set_xlabel(_AXIS_KEY[axis])
            ax.set_ylabel("step time × non-private")
            ax.set_title(f"{block}: {axis}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, title="dotted: flop model; marker: chosen\n(o ghost, □ inst.)",
                      title_fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: SweepConfig, out: Path, command: str, progress: bool = True) -> list[dict[str, Any]]:
    """Run the sweep, write ``sweep.json``, ``sweep.md`` and ``sweep.png`` to ``out``, print the tables.

    Returns:
        One row per (block, axis, value).
    """
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        meta = machine_info(cfg.threads, "cpu") | {"command": command, "config": asdict(cfg)}
        start = time.perf_counter()
        rows = run_sweep(cfg, progress)
        meta["seconds"] = time.perf_counter() - start
        meta["load_avg_end"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(threads)
    head = (f"swiftdp bench --sweep — {meta['cpu']}, {meta['threads']} thread(s), "
            f"torch {meta['torch']}, {meta['date']}, {meta['seconds']:.0f} s")
    text = f"{head}\n\nCommand: `{command}`\n\n{markdown(rows, cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {"meta": meta, "points": rows, "growth": growth(rows)}, indent=1, default=str) + "\n",
        encoding="utf-8")
    (out / "sweep.md").write_text(text, encoding="utf-8")
    write_plot(out / "sweep.png", rows, cfg, head)
    print(text)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return rows
