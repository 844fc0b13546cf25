"""Turning benchmark results into a markdown table, a target summary, JSON and a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from swiftdp.bench.methods import BASELINE, OPACUS_METHODS

TIME_TARGET = 1.15
MEMORY_TARGET = 1.15
OPACUS_SPEEDUP_TARGET = 2.0
DEFAULT_METHOD = "swiftdp"


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _notes(r: dict[str, Any]) -> str:
    parts = list(r.get("notes") or [])
    if r.get("status") == "failed":
        where = f" at {r['where']}" if r.get("where") else ""
        parts.append(f"FAILED{where}: {r.get('error')}")
    elif r.get("status") == "unavailable":
        parts.append(f"not run: {r.get('error')}")
    elif r.get("rounds") is not None:
        parts.append(f"{r['rounds']} timed steps")
    return "; ".join(parts).replace("|", "\\|")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """A markdown table with one row per (model, method).

    Columns: step time (median), its ratio to the non-private step measured
    interleaved in the same process, raw peak memory and its ratio to the
    non-private process' peak, the peak above the idle process ("train MB")
    and its ratio, the peak of a steady-state step above the idle process
    ("steady MB": a step that neither probes the batch nor checks the loss)
    and its ratio, examples per second, the largest batch (CUDA), notes.
    """
    has_max = any(r.get("max_batch") is not None for r in results)
    head = ["model", "method", "batch", "step ms", "× time", "peak MB", "× mem",
            "train MB", "× train mem", "steady MB", "× steady mem", "ex/s"]
    if has_max:
        head.append("max batch")
    head.append("notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ok = r.get("status") == "ok"
        row = [
            r["model"], r["method"], str(r.get("batch_size", "—")),
            _fmt(r.get("step_ms") if ok else None, ".1f"),
            _fmt(r.get("ratio") if ok else None, ".2f"),
            _fmt(r.get("peak_mb") if ok else None, ".0f"),
            _fmt(r.get("mem_ratio") if ok else None, ".2f"),
            _fmt(r.get("train_mb") if ok else None, ".0f"),
            _fmt(r.get("train_mem_ratio") if ok else None, ".2f"),
            _fmt(r.get("steady_mb") if ok else None, ".0f"),
            _fmt(r.get("steady_mem_ratio") if ok else None, ".2f"),
            _fmt(r.get("examples_per_s") if ok else None,
                 ".0f" if (r.get("examples_per_s") or 0) >= 10 else ".2f"),
        ]
        if has_max:
            row.append(str(r.get("max_batch", "—")))
        row.append(_notes(r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def targets(results: list[dict[str, Any]], method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """Check the issue's targets for ``method`` (swiftdp default).

    * time: ``ratio <= 1.15`` on every model, or the model's own
      ``time_target`` where its result carries one (GPT-2 small on a CPU:
      1.2 full fine-tuning, 1.1 LoRA);
    * memory: ``train_mem_ratio <= 1.15`` (the peak above the idle process,
      every step of the warm-up included) on every model; the raw peaks'
      ratio and the steady-state step's are reported alongside;
    * Opacus: the geometric mean over the models where some Opacus mode ran
      of (best Opacus time ratio) / (swiftdp time ratio) is at least 2.
      Both ratios are to the non-private step measured interleaved in the
      same process, which cancels drift between processes.

    Returns:
        A dict with per-model figures and ``time_met``, ``memory_met``,
        ``opacus_met`` and ``opacus_geomean_speedup``.
    """
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    per_model: dict[str, dict[str, Any]] = {}
    speedups: list[float] = []
    for model, rs in by_model.items():
        s = rs.get(method)
        if s is None or s.get("status") != "ok":
            per_model[model] = {"status": "swiftdp did not run" if s is None else s.get("error")}
            continue
        opac = {m: rs[m]["ratio"] for m in OPACUS_METHODS
                if m in rs and rs[m].get("status") == "ok"}
        best = min(opac.items(), key=lambda kv: kv[1]) if opac else None
        limit = float(s.get("time_target") or TIME_TARGET)
        entry: dict[str, Any] = {
            "ratio": s["ratio"], "mem_ratio": s.get("mem_ratio"),
            "train_mem_ratio": s.get("train_mem_ratio"), "time_target": limit,
            "time_ok": s["ratio"] <= limit,
            "steady_mem_ratio": s.get("steady_mem_ratio"),
            "memory_ok": (s.get("train_mem_ratio") or math.inf) <= MEMORY_TARGET,
            "best_opacus": best[0] if best else None,
            "speedup_vs_opacus": best[1] / s["ratio"] if best else None,
        }
        if best:
            speedups.append(best[1] / s["ratio"])
        per_model[model] = entry
    ran = [e for e in per_model.values() if "ratio" in e]
    geo = _geomean(speedups)
    return {
        "per_model": per_model,
        "time_met": bool(ran) and len(ran) == len(per_model) and all(e["time_ok"] for e in ran),
        "memory_met": bool(ran) and len(ran) == len(per_model)
        and all(e["memory_ok"] for e in ran),
        "opacus_geomean_speedup": geo,
        "opacus_met": None if geo is None else geo >= OPACUS_SPEEDUP_TARGET,
    }


def targets_markdown(t: dict[str, Any]) -> str:
    """The target check as a short markdown list."""

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    own = {m: e["time_target"] for m, e in t["per_model"].items()
           if e.get("time_target", TIME_TARGET) != TIME_TARGET}
    limits = f"{TIME_TARGET}x" + "".join(f"; {m} {v}x" for m, v in own.items())
    lines = [
        f"- swiftdp default ≤ its target × non-private step time ({limits}) on every model: "
        f"**{mark(t['time_met'])}**",
        f"- swiftdp default ≤ {MEMORY_TARGET}x non-private peak memory above the idle process "
        "on every model: "
        f"**{mark(t['memory_met'])}**",
        f"- swiftdp default ≥ {OPACUS_SPEEDUP_TARGET}x faster than the best Opacus mode "
        f"(geometric mean): **{mark(t['opacus_met'])}** "
        + ("" if t["opacus_geomean_speedup"] is None
           else f"({t['opacus_geomean_speedup']:.2f}x)"),
        "",
        "| model | × time | target | × mem (raw) | × mem (above idle) | × mem (steady step) "
        "| best Opacus | speed-up vs it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, e in t["per_model"].items():
        if "ratio" not in e:
            lines.append(f"| {model} | — | — | — | — | — | — | {e.get('status')} |")
            continue
        lines.append(
            f"| {model} | {e['ratio']:.2f}{'' if e['time_ok'] else ' ✗'} | "
            f"≤ {e['time_target']:g} | "
            f"{_fmt(e['mem_ratio'], '.2f')} | "
            f"{_fmt(e['train_mem_ratio'], '.2f')}{'' if e['memory_ok'] else ' ✗'} | "
            f"{_fmt(e.get('steady_mem_ratio'), '.2f')} | {e['best_opacus'] or 'none ran'} | "
            f"{_fmt(e['speedup_vs_opacus'], '.2f')} |"
        )
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]],
               target_check: dict[str, Any]) -> None:
    """Write ``{"meta", "results", "targets"}`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": results, "targets": target_check}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def write_chart(path: Path, results: list[dict[str, Any]], title: str) -> None:
    """A PNG with two panels: step time and peak memory (above idle), both × non-private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m != BASELINE]
    lookup = {(r["model"], r["method"]): r for r in results}
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(models) + 3), 7.5), sharex=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, label in ((axes[0], "ratio", "step time × non-private (log)"),
                           (axes[1], "train_mem_ratio", "peak memory above idle × non-private")):
        for j, method in enumerate(methods):
            xs, ys = [], []
            for i, model in enumerate(models):
                r = lookup.get((model, method))
                v = r.get(key) if r and r.get("status") == "ok" else None
                if v is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=method)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].axhline(TIME_TARGET, color="red", lw=0.8, ls="--")
    axes[1].axhline(MEMORY_TARGET, color="red", lw=0.8, ls="--")
    axes[1].set_xticks(range(len(models)))
    axes[1].set_xticklabels(models)
    axes[0].legend(fontsize=7, ncol=min(4, max(1, len(methods))))
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
