"""``swiftdp bench --sweep``: the quick sweep end to end, its layer inventory and flop model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import swiftdp
from swiftdp.bench import cli, sweep
from swiftdp.clipping.cost import ModePolicy


def test_quick_sweep_writes_json_markdown_and_png_with_every_point(tmp_path: Path) -> None:
    # its own process, as users run it (and no allocations left in the test worker)
    proc = subprocess.run(
        [sys.executable, "-m", "swiftdp.bench", "--sweep", "--quick", "--threads", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "sweep transformer" in proc.stderr  # progress, one line per point
    assert "### Choice against the measured optimum" in proc.stdout
    data = json.loads((tmp_path / "sweep.json").read_text())
    points = data["points"]
    want = sweep.grid_points(sweep.QUICK)
    assert [(p["block"], p["axis"], p["d"], p["T"], p["B"]) for p in points] == want
    for p in points:
        assert p["status"] == "ok", p
        assert set(p["ratio"]) == set(sweep.OBJECTIVES)
        assert all(math.isfinite(v) and v > 0 for v in p["ratio"].values())
        assert all(len(p["times_ms"][m]) == p["rounds"] for m in sweep.METHODS)
        assert p["predicted"]["time"] >= 1.0 and math.isfinite(p["excess"])
        # "chosen" is ModePolicy's choice for the block's layers
        for layer in sweep.layers(p["block"], p["d"], p["T"]):
            policy = ModePolicy("bk", "time")
            pick = policy.factored_conv if layer.kind == "conv" else policy.factored
            ghost = pick(layer.seq_len, layer.d_in, layer.d_out)
            assert p["chosen"]["layers"][layer.name] == ("ghost" if ghost else "instantiate")
    assert data["meta"]["threads"] == 1 and data["growth"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "sweep.md").read_text()
    for block in sweep.BLOCKS:
        for axis in sweep.AXES:
            assert f"### {block}, {axis}" in text
    assert "### Growth along d and T" in text


@pytest.mark.parametrize("block", sweep.BLOCKS)
def test_layer_inventory_is_what_the_engine_asks_the_cost_model(
    block: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    d, t = 16, 9
    asked: list[tuple[str, tuple[int, ...]]] = []
    factored, factored_conv = ModePolicy.factored, ModePolicy.factored_conv
    in_conv = [False]  # factored_conv asks factored itself: count the conv's question once

    def linear(self: ModePolicy, *shape: int) -> bool:
        if not in_conv[0]:
            asked.append(("linear", shape))
        return factored(self, *shape)

    def conv(self: ModePolicy, *shape: int) -> bool:
        asked.append(("conv", shape))
        in_conv[0] = True
        try:
            return factored_conv(self, *shape)
        finally:
            in_conv[0] = False

    monkeypatch.setattr(ModePolicy, "factored", linear)
    monkeypatch.setattr(ModePolicy, "factored_conv", conv)
    torch.manual_seed(0)
    model = sweep.build(block, d)
    x, y = sweep.make_batch(block, d, t, 3, 0)
    clipper = swiftdp.GradClipper(model, 1.0)
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        clipper.remove()
    want = [(ly.kind, (ly.seq_len, ly.d_in, ly.d_out)) for ly in sweep.layers(block, d, t)]
    assert sorted(asked) == sorted(want)


def test_conv_positions_are_a_near_square_grid() -> None:
    assert sweep.grid(64) == (8, 8)
    assert sweep.grid(128) == (8, 16)
    assert sweep.grid(1024) == (32, 32)
    x, _ = sweep.make_batch("conv", 4, 512, 2, 0)
    assert x.shape == (2, 4, 16, 32)


def test_flop_model_of_one_transformer_shape_by_hand() -> None:
    d, t = 64, 256
    # forward: 2·T·d·(3d + d + 4d + 4d) + head 2·d·10 + attention 4·T²·d
    fwd = 2 * 256 * 64 * (12 * 64) + 2 * 64 * 10 + 4 * 256 * 256 * 64
    assert sweep.forward_flops("transformer", d, t) == fwd == 41_944_320
    # ghost extra per layer 2·T²(d + p); the head (T = 1) 2·(d + p)
    ghost = 2 * 256 * 256 * (4 * 64 + 2 * 64 + 5 * 64 + 5 * 64) + 2 * (64 + 10)
    assert sum(sweep.dp_extra_flops(ly, True) for ly in sweep.layers("transformer", d, t)) == ghost
    # instantiated extra 4·p·d per layer
    inst = 4 * (3 * 64 * 64 + 64 * 64 + 4 * 64 * 64 + 4 * 64 * 64 + 10 * 64)
    assert sum(sweep.dp_extra_flops(ly, False) for ly in sweep.layers("transformer", d, t)) == inst
    assert sweep.predicted_ratio("transformer", d, t, "ghost") == pytest.approx(
        (3 * fwd + ghost) / (3 * fwd))
    assert sweep.predicted_ratio("transformer", d, t, "instantiate") == pytest.approx(
        (3 * fwd + inst) / (3 * fwd))
    # the shipped choice: the four sequence layers instantiated, the pooled head ghost
    chosen = sweep.choice_summary("transformer", d, t)
    assert chosen["instantiate"] == 4 and chosen["ghost"] == 1
    assert chosen["dominant"] == "instantiate"
    assert sweep.predicted_ratio("transformer", d, t, "time") == pytest.approx(
        (3 * fwd + inst - 4 * 10 * 64 + 2 * 74) / (3 * fwd))


def test_flop_model_of_one_conv_shape_by_hand() -> None:
    d, t = 32, 16
    fwd = 2 * (2 * 16 * 9 * 32 * 32) + 2 * 32 * 10
    assert sweep.forward_flops("conv", d, t) == fwd
    conv_ghost = 2 * 16 * 16 * (9 * 32 + 32)
    extra = sum(sweep.dp_extra_flops(ly, True) for ly in sweep.layers("conv", d, t))
    assert extra == 2 * conv_ghost + 2 * (32 + 10)
    # T²(d + p) = 256·320 well under 2·32 passes × p·d = 64·9216: ghost
    assert sweep.choice_summary("conv", d, t)["dominant"] == "ghost"


def test_bench_parser_takes_sweep_with_quick_threads_and_out() -> None:
    import argparse

    args = cli.configure_parser(argparse.ArgumentParser()).parse_args(
        ["--sweep", "--quick", "--threads", "2", "--out", "x"])
    assert args.sweep and args.quick and args.threads == 2 and args.out == Path("x")
    assert not cli.configure_parser(argparse.ArgumentParser()).parse_args([]).sweep
