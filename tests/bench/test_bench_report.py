"""Target checks and the markdown table."""

from __future__ import annotations

from typing import Any

import pytest

from swiftdp.bench.report import markdown_table, targets


def _r(model: str, method: str, ratio: float, mem: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"model": model, "method": method, "status": "ok", "ratio": ratio, "mem_ratio": mem,
            "train_mem_ratio": mem, "step_ms": 10 * ratio, "peak_mb": 100 * mem,
            "train_mb": 50.0, "examples_per_s": 6.4, "batch_size": 64, "rounds": 20} | kw


def test_targets_use_the_best_opacus_mode_and_a_geometric_mean() -> None:
    res = [
        _r("a", "nonprivate", 1.0), _r("a", "swiftdp", 1.12, 1.1),
        _r("a", "opacus-hooks", 4.8), _r("a", "opacus-ghost", 3.6),
        _r("b", "nonprivate", 1.0), _r("b", "swiftdp", 1.15),
        {"model": "b", "method": "opacus-hooks", "status": "failed", "error": "x"},
        _r("c", "nonprivate", 1.0), _r("c", "swiftdp", 1.0), _r("c", "opacus-functorch", 1.0),
    ]
    t = targets(res)
    assert t["per_model"]["a"]["best_opacus"] == "opacus-ghost"
    assert t["per_model"]["a"]["speedup_vs_opacus"] == pytest.approx(3.6 / 1.12)
    assert t["per_model"]["b"]["speedup_vs_opacus"] is None  # Opacus could not run it
    assert t["opacus_geomean_speedup"] == pytest.approx((3.6 / 1.12) ** 0.5)
    assert t["time_met"] and t["memory_met"] and t["opacus_met"] is False


def test_time_and_memory_targets_missed_on_one_model() -> None:
    t = targets([_r("a", "swiftdp", 1.16), _r("b", "swiftdp", 1.0, 1.16)])
    assert not t["time_met"] and not t["memory_met"] and t["opacus_met"] is None


def test_table_has_a_row_per_result_and_escapes_pipes() -> None:
    rows = [_r("a", "nonprivate", 1.0),
            {"model": "a", "method": "opacus-hooks", "status": "failed", "error": "bad | x",
             "batch_size": 64, "notes": ["ModuleValidator.fix: LSTM→DPLSTM x1"]}]
    table = markdown_table(rows).splitlines()
    assert len(table) == 4
    assert "FAILED: bad \\| x" in table[3] and "LSTM→DPLSTM" in table[3]
    assert "| a | nonprivate | 64 | 10.0 | 1.00 |" in table[2]
