"""The data-parallel scaling benchmark: a real 2-rank ``torchrun`` at the tiniest settings.

Only the output's shape is checked here; speed targets are the benchmark's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swiftdp.bench import cli
from swiftdp.bench.scaling import ScalingConfig, check_config, combine_ranks, markdown_table, pool


def test_two_rank_run_writes_a_well_formed_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    proc = subprocess.run(
        [sys.executable, "-m", "swiftdp.bench.scaling", "--nproc", "2", "--models", "mlp",
         "--steps", "2", "--warmup", "1", "--batch-size", "8", "--timeout-s", "150",
         "--out", str(out)],
        capture_output=True, text=True, timeout=200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    meta, results = data["meta"], data["results"]
    assert meta["command"].startswith("python -m swiftdp.bench.scaling --nproc 2")
    assert "commit" in meta and "dirty" in meta and meta["cpu"] and meta["cores"]
    assert meta["config"]["nprocs"] == [2] and meta["config"]["threads"] == 1
    (r,) = results
    assert r["status"] == "ok" and r["model"] == "mlp" and r["nproc"] == 2
    assert r["batch_size"] == 8 and r["steps"] == 2 and r["threads"] == 1
    for m in ("ddp", "swiftdp"):
        assert len(r[f"{m}_step_ms_all"]) == 2
        assert r[f"{m}_step_ms"] > 0 and r[f"{m}_examples_per_s"] > 0
        assert r[f"{m}_speedup"] == 1.0  # the only rank count is its own reference
    assert r["ratio"] == pytest.approx(r["swiftdp_step_ms"] / r["ddp_step_ms"])
    assert r["params"] > 0 and r["grad_mb"] == pytest.approx(4 * r["params"] / 2**20)
    assert 0 <= r["max_share_mean"] <= r["global_batch_mean"]
    table = (out / "table.md").read_text()
    assert "| model | params | global batch | ranks |" in table
    assert "| mlp | " in table and " | 8 | 2 | " in table


def _rank(ddp: list[float], dp: list[float], local: list[int]) -> dict[str, object]:
    return {"ddp_s": ddp, "swiftdp_s": dp, "local_batch": local, "params": 10,
            "allreduce_ms": 0.5}


def test_a_step_takes_as_long_as_its_slowest_rank_and_speedups_are_per_method() -> None:
    two = combine_ranks([_rank([0.2, 0.3], [0.4, 0.5], [3, 5]),
                         _rank([0.25, 0.1], [0.3, 0.6], [4, 4])])
    assert two["ddp_s"] == [0.25, 0.3] and two["swiftdp_s"] == [0.4, 0.6]
    assert two["global_batch"] == [7, 9] and two["max_share"] == [4, 5]
    one = combine_ranks([_rank([0.55, 0.55], [0.9, 1.1], [7, 9])])
    runs = [{"model": "mlp", "nproc": n, "status": "ok"} | r for n, r in ((1, one), (2, two))]
    rows = pool(ScalingConfig(models=("mlp",), nprocs=(1, 2), batch_size=8), runs)
    assert [r["nproc"] for r in rows] == [1, 2]
    assert rows[1]["ddp_speedup"] == pytest.approx(0.55 / 0.275)
    assert rows[1]["swiftdp_speedup"] == pytest.approx(1.0 / 0.5)
    assert rows[1]["ratio"] == pytest.approx(0.5 / 0.275)
    assert rows[0]["ddp_examples_per_s"] == pytest.approx(8 / 0.55)
    assert "| mlp | 0.00M | 8 | 2 |" in markdown_table(rows)


def test_a_failed_run_is_a_failed_row_not_a_crash() -> None:
    rows = pool(ScalingConfig(models=("mlp",), nprocs=(2,), batch_size=8),
                [{"model": "mlp", "nproc": 2, "status": "failed", "error": "timed out"}])
    assert rows[0]["status"] == "failed" and "timed out" in rows[0]["error"]
    assert "FAILED: timed out" in markdown_table(rows)


def test_a_batch_the_ranks_cannot_split_is_refused_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="--batch-size"):
        check_config(ScalingConfig(models=("mlp",), nprocs=(1, 3), batch_size=8))
    assert cli.main(["--nproc", "3", "--models", "mlp", "--batch-size", "8"]) == 2
