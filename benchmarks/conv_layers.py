"""Per-layer DP work of the convolution rule against the non-private weight gradient.

For each convolution shape of the suite's ResNet-18-GN (batch 64, 32x32
inputs, widths 16-128) and GroupNorm CNN (widths 32-128) this times, on the same random input and output
gradient, everything swiftdp does for the layer's weight in a ``bk`` step
(the per-example norms and the clipped sum, :class:`ConvFactors`) by each
of its three ways, and the non-private step's weight gradient it replaces:

* ``ghost``: unfold, Gram matrices (float64-bounded), clipped sum by one
  native weight-gradient convolution;
* ``inst (unfold)``: unfold + batched matmul into ``(B, *weight)``, float64
  norms, clipped sum ``w @ G``;
* ``inst (native)``: the batch-grouped native weight-gradient kernel into
  ``(B, *weight)``, then the same;
* ``non-private dW``: ``convolution_backward`` of the weight alone.

The cost model's choice is marked. The median of ``--repeats`` timings is
printed (ms).

Usage::

    .venv/bin/python benchmarks/conv_layers.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from swiftdp.clipping.cost import ModePolicy
from swiftdp.layers import conv, conv_geometry

# (C_in, C_out, H, stride, kernel) of ResNet-18-GN (small) and its stem, then the
# GroupNorm CNN's three convs
SHAPES = [
    (3, 16, 32, 1, 3), (16, 16, 32, 1, 3), (16, 32, 32, 2, 3), (16, 32, 32, 2, 1),
    (32, 32, 16, 1, 3), (32, 64, 16, 2, 3), (32, 64, 16, 2, 1), (64, 64, 8, 1, 3),
    (64, 128, 8, 2, 3), (64, 128, 8, 2, 1), (128, 128, 4, 1, 3),
    (3, 32, 32, 1, 3), (32, 64, 16, 1, 3), (64, 128, 8, 1, 3),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_layer(c_in: int, c_out: int, h: int, s: int, k: int, *, batch: int, repeats: int,
               policy: ModePolicy) -> str:
    """One table row: the three ways, the non-private weight gradient, the choice."""
    B = batch
    pad = k // 2
    torch.manual_seed(0)
    x = torch.randn(B, c_in, h, h)
    h_out = (h + 2 * pad - k) // s + 1
    g = torch.randn(B, c_out, h_out, h_out)
    w = torch.nn.Parameter(torch.randn(c_out, c_in, k, k))
    spec = conv.ConvSpec((k, k), (s, s), (pad, pad), (1, 1), 1)
    weights = torch.rand(B)

    def dp_work(ghost: bool) -> torch.Tensor:
        f = conv.ConvFactors(w, x, g, spec, ghost=ghost)
        f.sq_norms()
        return f.weighted_sum(weights)

    T, d = h_out * h_out, c_in * k * k
    ghost_t = median_ms(lambda: dp_work(True), repeats)
    saved = conv_geometry._use_unfold
    try:
        conv_geometry._use_unfold = lambda *_: True  # type: ignore[assignment]
        unfold_t = median_ms(lambda: dp_work(False), repeats)
        conv_geometry._use_unfold = lambda *_: False  # type: ignore[assignment]
        native_t = median_ms(lambda: dp_work(False), repeats)
    finally:
        conv_geometry._use_unfold = saved
    template = torch.empty(c_out, c_in, k, k)
    dw_t = median_ms(lambda: torch.ops.aten.convolution_backward(
        g, x, template, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
        [False, True, False])[1], repeats)
    if policy.factored_conv(T, d, c_out):
        chosen, chosen_t = "ghost", ghost_t
    elif conv_geometry._use_unfold(T, c_out, d):
        chosen, chosen_t = "inst (unfold)", unfold_t
    else:
        chosen, chosen_t = "inst (native)", native_t
    return (f"| {c_in}→{c_out}, {h}, {s}, {k} | {T}, {d}, {c_out} | {chosen} | {ghost_t:.2f} | "
            f"{unfold_t:.2f} | {native_t:.2f} | {dw_t:.2f} | {chosen_t / dw_t:.1f} |")


def main(argv: list[str] | None = None) -> int:
    """Print the per-layer table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    B, policy = a.batch, ModePolicy("bk")
    print(f"# conv layers, batch {B}, {torch.get_num_threads()} threads, ms (median)\n")
    print("| C_in→C_out, H, stride, k | T, d, p | chosen | ghost | inst (unfold) | inst (native) "
          "| non-private dW | chosen / dW |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        print(time_layer(*shape, batch=B, repeats=a.repeats, policy=policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
