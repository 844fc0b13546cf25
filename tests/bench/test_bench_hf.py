"""The Hugging Face rows: their specs, a tiny run through the worker, and what is reported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from swiftdp.bench import cli, worker
from swiftdp.bench import hf as bench_hf
from swiftdp.bench.models import HF_SUITE, SUITE, describe, get_model
from swiftdp.bench.report import markdown_table, targets, targets_markdown
from swiftdp.bench.runner import SuiteConfig, run_worker
from swiftdp.errors import InvalidArgumentError

needs_hf = pytest.mark.skipif(not bench_hf.hf_available(), reason="needs the [hf] extra")


@needs_hf
def test_hf_rows_describe_the_published_configs_without_building_them() -> None:
    sizes = {n: describe(n) for n in HF_SUITE}
    assert sizes["gpt2-small"]["params"] == 124_439_808  # GPT-2 small, tied head
    lora = sizes["gpt2-small-lora"]
    assert lora["params"] == 12 * 8 * ((768 + 3 * 768) + (768 + 768) + (4 * 768 + 768))
    assert lora["total_params"] == 124_439_808 + lora["params"]
    assert sizes["bert-base"]["params"] == 109_483_778  # BERT-base + a 2-label head
    assert 30e6 < int(sizes["llama"]["params"]) < 124e6  # type: ignore[call-overload]
    assert all("T=128" in str(d["description"]) and d["batch_size"] == 4 for d in sizes.values())


def test_hf_rows_stay_out_of_the_default_suite_and_take_tiny_only_themselves() -> None:
    assert not set(HF_SUITE) & set(SUITE)
    assert cli.configure_parser(__import__("argparse").ArgumentParser()).parse_args(
        ["--models", "hf,mlp,gpt2-small"]).models == (*HF_SUITE, "mlp")
    with pytest.raises(InvalidArgumentError, match="Hugging Face rows only"):
        get_model("mlp", "tiny")
    assert get_model("llama", "tiny").input_shape == (16,)
    assert get_model("gpt2-small").time_target == 1.2
    assert get_model("gpt2-small-lora").time_target == 1.1


@needs_hf
@pytest.mark.parametrize("name", ["gpt2-small", "bert-base", "llama"])
def test_opacus_ghost_loss_is_the_models_own_loss(name: str) -> None:
    spec = get_model(name, "tiny")
    torch.manual_seed(0)
    model = spec.build().eval()
    x, y = spec.make_batch(3)

    def criterion(logits: Tensor, target: Tensor, shape: torch.Size | None = None) -> Tensor:
        per = F.cross_entropy(logits, target, reduction="none")  # as Opacus' wrapper reduces
        return (per.view(*shape).mean(1) if shape is not None else per).mean()

    own = spec.loss(model, x, y)
    assert torch.allclose(spec.ghost_loss(model, x, y, criterion), own, atol=1e-6)


@needs_hf
def test_quick_tiny_hf_row_runs_through_the_worker_for_nonprivate_and_swiftdp() -> None:
    cfg = cli.config_from_args(cli.configure_parser(__import__("argparse").ArgumentParser())
                               .parse_args(["--quick", "--size", "tiny", "--models", "gpt2-small",
                                            "--threads", "1"]))
    dp = run_worker(cfg, "gpt2-small", "swiftdp")  # a fresh worker process, as the suite runs it
    assert dp["status"] == "ok", dp.get("error")
    assert dp["batch_size"] == 8 and dp["rounds"] == 3 and len(dp["base_step_ms_all"]) == 3
    assert dp["notes"] == ["default: mode bk"] and dp["time_target"] == 1.2
    base = worker.measure(get_model("gpt2-small", "tiny"), "nonprivate", batch_size=8,
                          warmup=1, max_rounds=2, min_rounds=1)
    assert base["status"] == "ok" and base["ratio"] == 1.0
    t = targets([base, dp])
    assert t["per_model"]["gpt2-small"]["time_target"] == 1.2
    assert "gpt2-small 1.2x" in targets_markdown(t)


def test_without_the_hf_extra_the_rows_say_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_hf, "hf_available", lambda: False)
    cfg = SuiteConfig(models=("gpt2-small",), methods=("swiftdp",), size="tiny")
    row = run_worker(cfg, "gpt2-small", "swiftdp")  # no worker process is started
    assert row["status"] == "unavailable" and "needs the [hf] extra" in row["error"]
    assert "not run: needs the [hf] extra" in markdown_table([row | {"batch_size": 4}])
    res = worker.measure(get_model("llama", "tiny"), "nonprivate", batch_size=2)
    assert res["status"] == "unavailable"
    info = describe("bert-base")
    assert info["params"] is None and "[hf]" in str(info["missing"])


def test_without_transformers_installed_the_runner_reports_not_run() -> None:
    code = (
        "import sys; sys.modules['transformers'] = sys.modules['peft'] = None\n"
        "from swiftdp.bench.models import HF_SUITE, describe\n"
        "from swiftdp.bench.runner import SuiteConfig, run_suite\n"
        "assert describe('gpt2-small')['params'] is None\n"
        "rows = run_suite(SuiteConfig(models=HF_SUITE, methods=('swiftdp',)), progress=False)\n"
        "assert [r['status'] for r in rows] == ['unavailable'] * 8, rows\n"
        "assert all('needs the [hf] extra' in r['error'] for r in rows)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_hf
def test_opacus_failures_on_gpt2_say_where_and_why() -> None:
    pytest.importorskip("opacus")
    spec = get_model("gpt2-small", "tiny")
    hooks = worker.measure(spec, "opacus-hooks", batch_size=4, warmup=1, max_rounds=1,
                           min_rounds=1)
    assert hooks["status"] == "failed" and hooks["error"].startswith("RuntimeError: stack")
    assert "clip_and_accumulate" in hooks["where"]
    assert "transformer.wpe.weight (1 row)" in hooks["where"]  # position ids shared by the batch
    assert "no Opacus hooks rule for Conv1D" in " ".join(hooks["notes"])
    ghost = worker.measure(spec, "opacus-ghost", batch_size=4, warmup=1, max_rounds=1,
                           min_rounds=1)
    assert "Parameter tying is not supported" in ghost["error"]
    assert "module lm_head (Linear)" in ghost["where"]
    row = markdown_table([hooks])
    assert "FAILED at opacus/optimizers/optimizer.py" in row


def test_a_models_own_time_target_replaces_the_general_one() -> None:
    def r(model: str, method: str, ratio: float, **kw: object) -> dict[str, object]:
        return {"model": model, "method": method, "status": "ok", "ratio": ratio,
                "mem_ratio": 1.0, "train_mem_ratio": 1.0} | kw

    t = targets([r("gpt2-small", "swiftdp", 1.25, time_target=1.2), r("mlp", "swiftdp", 1.14)])
    assert t["per_model"]["gpt2-small"]["time_ok"] is False
    assert t["per_model"]["mlp"]["time_ok"] is True and not t["time_met"]
    text = targets_markdown(t)
    assert "(1.15x; gpt2-small 1.2x)" in text and "| gpt2-small | 1.25 ✗ | ≤ 1.2 |" in text
