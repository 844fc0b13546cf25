"""The steady-state memory column: one step after the warm-up that neither probes nor checks."""

from __future__ import annotations

import sys

import pytest

from swiftdp.bench.models import get_model
from swiftdp.bench.runner import add_memory_ratios
from swiftdp.bench.worker import measure, steady_step_index


def test_the_steady_step_is_never_a_power_of_two():
    assert [steady_step_index(d) for d in (0, 1, 2, 3, 4, 5, 7, 8)] == [3, 3, 3, 5, 5, 6, 9, 9]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_measure_reports_a_steady_peak_and_the_runner_its_ratio():
    spec = get_model("mlp", "small")
    rows = [measure(spec, m, batch_size=8, warmup=1, max_rounds=2, min_rounds=1)
            for m in ("nonprivate", "swiftdp")]
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert r["steady_step"] == 3
        # (idle is read before the model is built; in a test process that ran other tests
        # first, malloc_trim can hand back more than the model holds: steady may be below it)
        assert 0 < r["steady_peak_mb"] <= r["peak_mb"] + 1.0
    add_memory_ratios(rows)
    assert "steady_mem_ratio" in rows[1] and "steady_mb" in rows[1]
