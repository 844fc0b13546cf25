"""Checks of the performance changes to the bound kernels (candidate tests/clipping/test_bound_kernels.py).

* float64 sums of squares formed block by block stay within their counted rounding
  (exact reference: math.fsum of float64 squares, exact for float32 inputs);
* instantiated norms stay upper bounds when chunked;
* total_sq_norms (batched over parameters) equals the sum of param_sq_norms up to its
  own float64 growth, never below it;
* every contribution's slack equals θ · base when it declares its parts;
* clip factors and the non-finite mask are those of the reference formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from swiftdp.clipping import rounding
from swiftdp.clipping.clip_fns import clip_factors, nonfinite_examples
from swiftdp.clipping.contributions import (
    U64,
    LinearFactors,
    NormOnly,
    PerSampleGrads,
    gamma,
    param_sq_norms,
    slack_from_parts,
    sq_norms_f64,
    total_sq_norms,
)
from swiftdp.layers.conv import ConvFactors, make_spec
from swiftdp.layers.embedding import NORM_METHODS, EmbeddingGrads


def _exact_sq(rows: torch.Tensor) -> list[float]:
    return [math.fsum(v * v for v in r.double().tolist()) for r in rows]


@pytest.mark.parametrize("shape", [(3, 50), (5, 1 << 17), (2, (1 << 19) + 7), (1, 3 << 19), (3, (1 << 19) + 5), (1 << 15, 70)])
def test_chunked_sum_of_squares_within_its_rounding(shape, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-20, 20, shape[1])[None, :].float()
    sq, k = sq_norms_f64(x)
    want = _exact_sq(x)
    for s, w in zip(sq.tolist(), want, strict=True):
        assert abs(s - w) <= gamma(k, U64) * w
    if shape[0] * shape[1] <= rounding._WHOLE:  # one call: exactly vector_norm's result
        assert torch.equal(sq, torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square())


def test_small_chunks_force_column_blocks_and_stay_bounds(monkeypatch):
    monkeypatch.setattr(rounding, "_CHUNK", 64)
    monkeypatch.setattr(rounding, "_WHOLE", 64)
    torch.manual_seed(1)
    x = torch.randn(7, 1000) * 1e15
    sq, k = rounding.sq_norms_f64(x)
    assert k > 1000 + 2
    for s, w in zip(sq.tolist(), _exact_sq(x), strict=True):
        assert abs(s - w) <= gamma(k, U64) * w
    n, kn = rounding.norms_f64(x)
    for v, w in zip(n.tolist(), _exact_sq(x), strict=True):
        assert abs(v * v - w) <= gamma(kn, U64) * w
    g = PerSampleGrads(torch.zeros(1000), x)
    assert all(a >= b for a, b in zip(g.sq_norms().tolist(), _exact_sq(x), strict=True))


def _mixed_uses() -> list[list]:
    torch.manual_seed(2)
    B = 6
    groups = []
    W = torch.zeros(5, 7)
    groups.append([LinearFactors(W, torch.randn(B, 1, 7), torch.randn(B, 1, 5), ghost=True)])
    groups.append([LinearFactors(W.clone(), torch.randn(B, 9, 7), torch.randn(B, 9, 5), ghost=True)])
    groups.append([LinearFactors(W.clone(), torch.randn(B, 9, 7), torch.randn(B, 9, 5), ghost=False)])
    groups.append([PerSampleGrads(torch.zeros(5), torch.randn(B, 5))])
    groups.append([NormOnly(LinearFactors(W.clone(), torch.randn(B, 4, 7), torch.randn(B, 4, 5),
                                          ghost=True))])
    groups.append([NormOnly(PerSampleGrads(torch.zeros(3), torch.randn(B, 3)))])
    tied = torch.zeros(11, 5)
    idx = torch.randint(0, 11, (B, 4))
    groups.append([EmbeddingGrads(tied, idx, torch.randn(B, 4, 5), method="pairs"),
                   LinearFactors(tied, torch.randn(B, 4, 5), torch.randn(B, 4, 11), ghost=True)])
    groups.append([EmbeddingGrads(torch.zeros(11, 5), idx, torch.randn(B, 4, 5), method="segments")])
    w64 = torch.zeros(3, 2, dtype=torch.float64)  # another compute dtype: its own largest float
    groups.append([PerSampleGrads(w64, torch.randn(B, 3, 2, dtype=torch.float64))])
    x = torch.randn(B, 2, 6, 6)
    spec, xe = make_spec(x, (3, 3), 1, 0, 1, 1)
    for ghost in (True, False):
        groups.append([ConvFactors(torch.zeros(3, 2, 3, 3), xe, torch.randn(B, 3, 4, 4), spec,
                                   ghost=ghost)])
    return groups


def test_total_sq_norms_is_the_sum_of_the_parameter_bounds():
    groups = _mixed_uses()
    want = sum(param_sq_norms(g) for g in groups)
    got = total_sq_norms(groups)
    assert got is not None
    assert bool((got >= want * (1 - 1e-15)).all())
    assert bool((got <= want * (1 + 1e-12)).all())
    assert total_sq_norms([]) is None


def test_total_sq_norms_keeps_nonfinite_examples_nonfinite():
    B = 4
    g = torch.randn(B, 5)
    g[1, 2] = float("nan")
    g[2, 0] = g[2, 1] = 3e38  # norm 4.2e38: beyond float32, reported inf
    uses = [[PerSampleGrads(torch.zeros(5), g)], [PerSampleGrads(torch.zeros(5), torch.randn(B, 5))]]
    got = total_sq_norms(uses)
    assert got is not None
    assert not math.isfinite(got[1].item()) and not math.isfinite(got[2].item())
    assert math.isfinite(got[0].item()) and math.isfinite(got[3].item())


@pytest.mark.parametrize("i", range(13))
def test_slack_parts_match_the_slack(i):
    flat = [c for g in _mixed_uses() for c in g]
    if i >= len(flat):
        return
    c = flat[i]
    if type(c).slack is slack_from_parts:
        theta, base = c.slack_parts()
        want = theta * (c.sq_norms().sqrt() if base is None else base)
        torch.testing.assert_close(c.slack(), want, rtol=0, atol=0)


def test_norm_only_keeps_the_source_slack():
    for c in [c for g in _mixed_uses() for c in g]:
        if isinstance(c, NormOnly):
            continue
        n = NormOnly(c)
        torch.testing.assert_close(n.slack(), c.slack(), rtol=0, atol=0)
        torch.testing.assert_close(param_sq_norms([n]), param_sq_norms([c]), rtol=0, atol=0)


def test_embedding_norms_unchanged_by_blocking():
    torch.manual_seed(3)
    for method in NORM_METHODS:
        e = EmbeddingGrads(torch.zeros(13, 8), torch.randint(0, 13, (5, 9)), torch.randn(5, 9, 8),
                           method=method)
        dense = e.instantiate(torch.float64).flatten(1)
        exact = torch.tensor(_exact_sq(dense), dtype=torch.float64)
        assert bool((e.sq_norms() >= exact).all())
        assert bool((e.mass() >= exact.sqrt() * (1 - 1e-15)).all())


def _ref_clip(norms, C, style):
    c = (C / (norms + 1e-6)).clamp(max=1.0) if style == "flat" else C / (norms + 0.01)
    return torch.where(torch.isfinite(norms), c, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("style", ["flat", "automatic"])
@pytest.mark.parametrize("C", [1.0, 0.1, 1e-30, 1e30, math.inf])
def test_clip_factors_are_the_reference_ones(dtype, style, C):
    vals = [0.0, 1e-300, 5e-324, 1e-7, 1e-6, 0.5, 1.0, 3.0, 1e30, 1e300, 1.7e308, math.inf,
            math.nan, 0.0099, 1e-2]
    x = torch.tensor(vals, dtype=dtype)
    a, b = _ref_clip(x, C, style), clip_factors(x.clone(), C, style, warn_nonfinite=False)
    assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
    xr = x.clone().requires_grad_(True)
    assert torch.equal(clip_factors(xr, C, style, warn_nonfinite=False).detach(), a)


def test_nonfinite_examples_mask():
    assert nonfinite_examples(torch.tensor([0.5, 1.0])) is None
    assert nonfinite_examples(torch.tensor([1e308, 1e308], dtype=torch.float64)) is None
    with pytest.warns(Warning):
        m = nonfinite_examples(torch.tensor([1.0, math.nan, math.inf, 2.0]))
    assert m is not None and m.tolist() == [False, True, True, False]


@pytest.mark.parametrize("pick", [[0], [0, 3], [0, 1, 3, 6], [3, 5, 8, 9], [1, 2, 4, 5, 7]])
def test_total_sq_norms_few_parameters(pick):
    groups = _mixed_uses()
    sel = [groups[i] for i in pick]
    want = sum(param_sq_norms(g) for g in sel)
    got = total_sq_norms(sel)
    assert got is not None
    assert bool((got >= want * (1 - 1e-15)).all()) and bool((got <= want * (1 + 1e-12)).all())
