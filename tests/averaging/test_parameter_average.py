"""ParameterAverage against float64 references computed by hand, swapping, resuming, refusals.

"A step" here writes new values into the parameters by hand, standing for an
optimizer step: the average only ever reads parameter values.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import swiftdp
from swiftdp import CheckpointError, InvalidArgumentError, ParameterAverage


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def _step(model, seed):
    """Overwrite the trainable parameters with new values (an "optimizer step")."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _values(model):
    return [p.detach().to(torch.float64).clone() for p in model.parameters()]


def _trajectory(model, steps, avg=None, first_seed=0):
    """θ_0, θ_1, …: the parameters before and after each step (updating ``avg``)."""
    thetas = [_values(model)]
    for k in range(first_seed, first_seed + steps):
        _step(model, k)
        if avg is not None:
            avg.update()
        thetas.append(_values(model))
    return thetas


def _reference(thetas, *, kind, decay=None, warmup=True, start_step=0):
    """The average after len(thetas) - 1 updates, by the formulas, in plain float64 loops."""
    avg = [t.clone() for t in thetas[0]]
    for n in range(1, len(thetas)):
        t = n - start_step - 1
        for i, new in enumerate(thetas[n]):
            if t < 0:
                avg[i] = new.clone()
            elif kind == "polyak":
                avg[i] = (t * avg[i] + new) / (t + 1)
            else:
                mu = min(decay, (1 + t) / (10 + t)) if warmup else decay
                avg[i] = mu * avg[i] + (1 - mu) * new
    return avg


def _averages(avg):
    return [a.to(torch.float64) for a in avg.state_dict()["averages"].values()]


def _assert_close(got, want, tol):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("start_step", [0, 3])
def test_ema_matches_float64_reference_with_its_warmup_schedule(warmup, start_step):
    model = _model()
    avg = ParameterAverage(model, decay=0.8, warmup=warmup, start_step=start_step)
    thetas = _trajectory(model, 12, avg)
    want = _reference(thetas, kind="ema", decay=0.8, warmup=warmup, start_step=start_step)
    _assert_close(_averages(avg), want, 1e-12)
    assert avg.num_updates == 12


def test_ema_without_warmup_matches_its_closed_form():
    # EMA from θ_0: μ^n θ_0 + Σ_k (1 − μ) μ^(n−k) θ_k.
    model, mu, n = _model(), 0.7, 9
    avg = ParameterAverage(model, decay=mu, warmup=False)
    thetas = _trajectory(model, n, avg)
    want = [mu**n * thetas[0][i] + sum((1 - mu) * mu ** (n - k) * thetas[k][i]
                                       for k in range(1, n + 1))
            for i in range(len(thetas[0]))]
    _assert_close(_averages(avg), want, 1e-12)


def test_polyak_is_the_mean_of_the_parameters_after_start_step():
    model = _model()
    avg = ParameterAverage(model, kind="polyak", start_step=4)
    thetas = _trajectory(model, 11, avg)
    want = [torch.stack([thetas[k][i] for k in range(5, 12)]).mean(0)
            for i in range(len(thetas[0]))]
    _assert_close(_averages(avg), want, 1e-12)
    _assert_close(_averages(avg), _reference(thetas, kind="polyak", start_step=4), 1e-12)


def test_before_start_step_the_average_is_the_current_parameters():
    model = _model()
    avg = ParameterAverage(model, decay=0.9, start_step=5)
    thetas = _trajectory(model, 5, avg)
    _assert_close(_averages(avg), thetas[-1], 0.0)


def test_float32_parameters_match_the_float64_reference_to_float32_precision():
    model = _model(torch.float32)
    avg = ParameterAverage(model, decay=0.9)
    thetas = _trajectory(model, 30, avg)
    assert all(a.dtype == torch.float32 for a in avg.state_dict()["averages"].values())
    _assert_close(_averages(avg), _reference(thetas, kind="ema", decay=0.9), 1e-5)


def test_bf16_parameters_are_averaged_in_float32():
    model = _model(torch.bfloat16)
    with torch.no_grad():  # values in [2, 4), where bf16's resolution is 2^-6
        for p in model.parameters():
            p.copy_(3.0 + p)
    avg = ParameterAverage(model, decay=0.999, warmup=False)
    thetas = [_values(model)]
    for k in range(40):  # small moves: (1 − μ)·Δ is far below bf16's resolution
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25 if k % 2 == 0 else -0.125)
        avg.update()
        thetas.append(_values(model))
    averages = avg.state_dict()["averages"]
    assert all(a.dtype == torch.float32 for a in averages.values())
    want = _reference(thetas, kind="ema", decay=0.999, warmup=False)
    _assert_close(_averages(avg), want, 1e-6)
    # The same updates accumulated in bf16 would not have moved at all.
    stuck = [t.to(torch.bfloat16) for t in thetas[0]]
    for theta in thetas[1:]:
        stuck = [s.lerp(t.to(torch.bfloat16), 0.001) for s, t in zip(stuck, theta, strict=True)]
    assert all(torch.equal(s, t.to(torch.bfloat16)) for s, t in zip(stuck, thetas[0], strict=True))
    assert not all(torch.equal(a.to(torch.bfloat16), t.to(torch.bfloat16))
                   for a, t in zip(_averages(avg), thetas[0], strict=True))
    with avg.applied() as m:  # swapped in, rounded to the parameters' dtype
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        for p, a in zip(m.parameters(), averages.values(), strict=True):
            assert torch.equal(p, a.to(torch.bfloat16))


# -- applied() ----------------------------------------------------------------------


def _bits(model):
    return [p.detach().clone() for p in [*model.parameters(), *model.buffers()]]


def _same_bits(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                           y.view(torch.uint8) if y.dtype.is_floating_point else y)
               for x, y in zip(a, b, strict=True))


def test_applied_swaps_in_the_average_and_restores_the_trained_weights_bitwise():
    model = _model(torch.float32)
    avg = ParameterAverage(model, decay=0.9)
    _trajectory(model, 6, avg)
    trained = _bits(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        reference = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        reference.load_state_dict(avg.averaged_state_dict())
        want = reference(x)
    with avg.applied() as m, torch.no_grad():
        assert m is model
        assert torch.equal(model(x), want)
        assert not _same_bits(_bits(model), trained)
    assert _same_bits(_bits(model), trained)


def test_applied_restores_the_trained_weights_bitwise_when_the_body_raises():
    model = _model(torch.float32)
    avg = ParameterAverage(model, decay=0.5)
    _trajectory(model, 4, avg)
    trained = _bits(model)
    with pytest.raises(KeyError, match="boom"), avg.applied():
        raise KeyError("boom")
    assert _same_bits(_bits(model), trained)
    avg.update()  # and the average is usable again


def test_update_and_nesting_inside_applied_are_refused():
    model = _model()
    avg = ParameterAverage(model)
    with avg.applied():
        with pytest.raises(InvalidArgumentError, match=re.escape("`update()` was called inside")):
            avg.update()
        with pytest.raises(InvalidArgumentError, match="already active"), avg.applied():
            pass
    assert avg.num_updates == 0


def test_buffers_are_left_alone_unless_included():
    model = _model()
    model.register_buffer("scale", torch.zeros(3, dtype=torch.float64))
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    plain = ParameterAverage(model, decay=0.5, warmup=False)
    with_buffers = ParameterAverage(model, decay=0.5, warmup=False, include_buffers=True)
    for k in (1, 2):
        model.scale.fill_(float(k))
        model.count.fill_(k)
        plain.update()
        with_buffers.update()
    assert sorted(with_buffers.state_dict()["averages"]) == sorted(
        ["0.weight", "0.bias", "2.weight", "2.bias", "scale", "count"])
    with plain.applied():
        assert torch.equal(model.scale, torch.full((3,), 2.0, dtype=torch.float64))
    with with_buffers.applied():  # 0.5·(0.5·0 + 0.5·1) + 0.5·2; the counter is copied
        assert torch.equal(model.scale, torch.full((3,), 1.25, dtype=torch.float64))
        assert model.count.item() == 2
    assert torch.equal(model.scale, torch.full((3,), 2.0, dtype=torch.float64))


def test_frozen_parameters_are_not_averaged():
    model = _model()
    model[0].weight.requires_grad_(False)
    avg = ParameterAverage(model)
    assert "0.weight" not in avg.state_dict()["averages"]
    assert "0.weight" in avg.averaged_state_dict()


def test_averaged_state_dict_fills_every_name_of_a_tied_weight():
    emb = nn.Embedding(5, 4, dtype=torch.float64)
    head = nn.Linear(4, 5, bias=False, dtype=torch.float64)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    avg = ParameterAverage(model, decay=0.5, warmup=False)
    before = emb.weight.detach().clone()
    with torch.no_grad():
        emb.weight.add_(2.0)
    avg.update()
    state = avg.averaged_state_dict()
    torch.testing.assert_close(state["0.weight"], before + 1.0)
    assert torch.equal(state["1.weight"], state["0.weight"])
    assert list(avg.state_dict()["averages"]) == ["0.weight"]


# -- state_dict / load_state_dict --------------------------------------------------------


@pytest.mark.parametrize(("kind", "settings"), [
    ("ema", {"decay": 0.9}),
    ("ema", {"decay": 0.95, "warmup": False, "start_step": 3}),
    ("polyak", {"start_step": 2}),
])
def test_state_dict_round_trip_resumes_bitwise(kind, settings):
    straight_model = _model(torch.float32)
    straight = ParameterAverage(straight_model, kind=kind, **settings)
    _trajectory(straight_model, 10, straight)

    first_model = _model(torch.float32)
    first = ParameterAverage(first_model, kind=kind, **settings)
    _trajectory(first_model, 5, first)
    saved = first.state_dict()
    resumed = ParameterAverage(first_model, kind=kind, **settings)  # fresh: built from θ_5
    resumed.load_state_dict(saved)
    assert resumed.num_updates == 5
    _trajectory(first_model, 5, resumed, first_seed=5)

    assert resumed.num_updates == straight.num_updates == 10
    got, want = resumed.state_dict()["averages"], straight.state_dict()["averages"]
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_state_dict_is_a_snapshot():
    model = _model()
    avg = ParameterAverage(model, decay=0.5)
    saved = avg.state_dict()
    first = saved["averages"]["0.weight"].clone()
    _trajectory(model, 3, avg)
    assert torch.equal(saved["averages"]["0.weight"], first)


def test_loading_into_another_model_names_the_mismatched_keys_and_shapes():
    saved = ParameterAverage(_model()).state_dict()
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2), nn.Linear(2, 2))
    avg = ParameterAverage(other.double())
    before = avg.state_dict()
    with pytest.raises(CheckpointError) as e:
        avg.load_state_dict(saved)
    message = str(e.value)
    assert "missing ['3.weight', '3.bias']" in message
    assert "0.weight: saved a tensor of shape (3, 4) vs model (5, 4)" in message
    assert "2.weight: saved a tensor of shape (2, 3) vs model (2, 5)" in message
    assert "Build the same model" in message
    after = avg.state_dict()  # nothing changed
    assert after["num_updates"] == 0
    assert all(torch.equal(after["averages"][k], v) for k, v in before["averages"].items())

    renamed = {**saved, "averages": {f"net.{k}": v for k, v in saved["averages"].items()}}
    with pytest.raises(CheckpointError, match=re.escape("unexpected ['net.0.weight'")):
        ParameterAverage(_model()).load_state_dict(renamed)


def test_loading_with_other_settings_or_not_a_state_is_refused():
    saved = ParameterAverage(_model(), decay=0.99).state_dict()
    with pytest.raises(CheckpointError, match=re.escape("decay: saved 0.99 vs now 0.999")):
        ParameterAverage(_model()).load_state_dict(saved)
    with pytest.raises(CheckpointError, match="kind: saved 'ema' vs now 'polyak'"):
        ParameterAverage(_model(), kind="polyak").load_state_dict(saved)
    with pytest.raises(CheckpointError, match=re.escape("Expected a ParameterAverage.state_dict()")):
        ParameterAverage(_model()).load_state_dict(_model().state_dict())
    with pytest.raises(CheckpointError, match="num_updates is -1"):
        ParameterAverage(_model(), decay=0.99).load_state_dict({**saved, "num_updates": -1})


def test_a_model_changed_after_construction_is_refused_by_name():
    model = _model()
    avg = ParameterAverage(model)
    model[2] = nn.Linear(3, 7).double()
    with pytest.raises(InvalidArgumentError, match=re.escape("2.weight: now (7, 3) vs average (2, 3)")):
        avg.update()


# -- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"decay": 1.0}, "Expected decay in [0, 1), got decay=1.0"),
    ({"decay": "0.9"}, "Expected decay to be a real number"),
    ({"kind": "swa"}, "Expected kind to be one of 'ema', 'polyak', got 'swa'"),
    ({"kind": "polyak", "decay": 0.9}, "`decay` is an EMA setting, got decay=0.9 with kind='polyak'"),
    ({"kind": "polyak", "warmup": False}, "`warmup` is an EMA setting"),
    ({"warmup": 1}, "Expected `warmup` to be True or False, got warmup=1"),
    ({"start_step": -1}, "Expected start_step >= 0, got -1"),
    ({"include_buffers": "yes"}, "Expected `include_buffers` to be True or False"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        ParameterAverage(_model(), **kwargs)


def test_a_model_without_trainable_parameters_is_refused():
    model = _model().requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match="no parameter with requires_grad=True"):
        ParameterAverage(model)


def test_exported_at_the_top_level():
    assert swiftdp.ParameterAverage is ParameterAverage
