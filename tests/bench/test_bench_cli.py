"""``swiftdp bench --quick`` end to end: the table, results.json and chart.png."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from swiftdp.bench import cli


def test_quick_bench_writes_table_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "swiftdp.bench", "--quick", "--models", "mlp",
         "--methods", "nonprivate,swiftdp", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| mlp | nonprivate | 8 |" in proc.stdout
    assert "| mlp | swiftdp | 8 |" in proc.stdout
    assert "bench" in proc.stderr  # the progress bar
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["nonprivate", "swiftdp"]
    assert all(r["status"] == "ok" for r in data["results"])
    assert data["meta"]["torch"] and data["meta"]["threads"] == 1
    assert data["results"][1]["ratio"] > 0 and data["results"][1]["mem_ratio"] > 0
    assert not (out / "results.partial.jsonl").exists()
    png = (out / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| mlp | nonprivate |" in table and "| mlp | swiftdp |" in table


def test_bad_options_exit_2_with_a_message(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["--models", "nope", "--quick"]) == 2
    assert "Unknown benchmark model 'nope'" in capsys.readouterr().err
    assert cli.main(["--methods", "opacus-magic"]) == 2
    assert "Unknown benchmark method" in capsys.readouterr().err


def test_add_parser_registers_bench_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="swiftdp")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--models", "mlp,cnn"])
    assert args.func is cli.run and args.models == ("mlp", "cnn") and args.quick
