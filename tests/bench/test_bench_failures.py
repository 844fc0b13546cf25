"""A method that fails is reported in the results, never raised."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from swiftdp.bench import methods as bench_methods
from swiftdp.bench import worker
from swiftdp.bench.models import SuiteModel, get_model
from swiftdp.bench.report import markdown_table
from swiftdp.bench.runner import SuiteConfig, run_suite, run_worker


class RootParamWithDropout(nn.Module):
    """Direct parameters on the root plus dropout: Opacus runs the root under vmap and fails."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.fc = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x * self.scale))


SPEC = SuiteModel("rootparam", "test model", RootParamWithDropout, (6,), 3, batch_size=4)


def _measure(method: str) -> dict[str, Any]:
    return worker.measure(SPEC, method, batch_size=4, warmup=1, max_rounds=2, min_rounds=1)


def test_opacus_failure_is_reported_with_its_error_not_raised() -> None:
    pytest.importorskip("opacus")
    res = _measure("opacus-hooks")
    assert res["status"] == "failed"
    assert "vmap" in res["error"] and res["error"].startswith("RuntimeError")
    row = markdown_table([res])
    assert "FAILED at " in row and ": RuntimeError" in row


def test_swiftdp_runs_the_same_model() -> None:
    res = _measure("swiftdp")
    assert res["status"] == "ok" and res["rounds"] == 2 and res["ratio"] > 0


def test_a_crash_while_wrapping_is_a_failed_result(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> None:
        raise NotImplementedError("layer X is not supported")

    monkeypatch.setattr(worker, "prepare", boom)
    res = _measure("swiftdp")
    assert res["status"] == "failed"
    assert res["error"] == "NotImplementedError: layer X is not supported"


def test_missing_opacus_is_reported_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_methods, "opacus_available", lambda: False)
    res = _measure("opacus-ghost")
    assert res["status"] == "unavailable" and "swiftdp[bench]" in res["error"]


def test_opacus_fix_notes_only_the_replaced_modules() -> None:
    pytest.importorskip("opacus")
    torch.manual_seed(0)
    _, notes = bench_methods.opacus_fix(get_model("encoder").build())
    assert notes == ["ModuleValidator.fix: MultiheadAttention→DPMultiheadAttention x2"]
    _, notes = bench_methods.opacus_fix(get_model("mlp").build())
    assert notes == []


def test_a_worker_that_prints_no_result_is_a_failed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SuiteConfig(models=("mlp",), methods=("swiftdp",), batch_size=2, timeout_s=60)
    monkeypatch.setattr(
        "swiftdp.bench.runner.worker_command",
        lambda *a: ["python", "-c", "import sys; sys.stderr.write('segfault-ish'); sys.exit(3)"],
    )
    res = run_worker(cfg, "mlp", "swiftdp")
    assert res["status"] == "failed" and "code 3" in res["error"] and "segfault-ish" in res["error"]


def test_suite_keeps_going_after_a_failure() -> None:
    def runner(cfg: SuiteConfig, model: str, method: str) -> dict[str, Any]:
        if method == "opacus-hooks":
            return {"model": model, "method": method, "status": "failed", "error": "boom"}
        return {"model": model, "method": method, "status": "ok", "peak_mb": 200.0,
                "idle_mb": 100.0, "ratio": 1.1}

    cfg = SuiteConfig(models=("mlp", "cnn"), methods=("swiftdp", "opacus-hooks"))
    res = run_suite(cfg, runner=runner, progress=False)
    assert [(r["model"], r["method"]) for r in res] == [
        ("mlp", "nonprivate"), ("mlp", "swiftdp"), ("mlp", "opacus-hooks"),
        ("cnn", "nonprivate"), ("cnn", "swiftdp"), ("cnn", "opacus-hooks"),
    ]
    assert res[1]["mem_ratio"] == 1.0 and res[1]["train_mem_ratio"] == 1.0
    assert "mem_ratio" not in res[2]
