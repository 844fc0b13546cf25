"""Input-space canaries: crafted training examples scored on the model the loop trained.

References here are independent: the scores against a per-example
``log_softmax`` computed by hand, the insertion against the inclusion mask.
The audit's power is shown on the model it is meant for: trained without
privacy on the 8x8 digits, a two-layer MLP memorises random-pixel canaries
with random labels and the bound is well above 1; the same loop through
``make_private`` at ε = 3 stays at or below the claim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.audit import InputCanaries
from swiftdp.cli.main import main
from swiftdp.data import load_dataset
from swiftdp.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", None)
    return d.train.x, d.train.y


def test_random_canaries_take_the_datas_shape_and_range_and_repeat_by_seed(digits):
    x, _ = digits
    a = InputCanaries.random(400, like=x, classes=10, seed=3)
    b = InputCanaries.random(400, like=x, classes=10, seed=3)
    c = InputCanaries.random(400, like=x, classes=10, seed=4)
    assert a.x.shape == (400, *x.shape[1:]) and a.x.dtype == x.dtype
    assert float(a.x.min()) >= float(x.min()) and float(a.x.max()) <= float(x.max())
    assert set(a.y.tolist()) <= set(range(10)) and len(set(a.y.tolist())) == 10
    assert torch.equal(a.x, b.x) and np.array_equal(a.included, b.included)
    assert not torch.equal(a.x, c.x)
    assert 150 < a.included.sum() < 250  # each kept with probability 1/2


def test_insert_appends_exactly_the_included_canaries(digits):
    x, y = digits
    can = InputCanaries.random(50, like=x, classes=10, seed=0)
    xx, yy = can.insert(x, y)
    k = int(can.included.sum())
    assert len(xx) == len(yy) == len(x) + k
    assert torch.equal(xx[:len(x)], x) and torch.equal(yy[:len(y)], y)
    kept = [i for i in range(50) if can.included[i]]
    assert torch.equal(xx[len(x):], can.x[kept]) and torch.equal(yy[len(y):], can.y[kept])


def test_scores_are_each_canarys_log_probability_of_its_label(digits):
    x, _ = digits
    can = InputCanaries.random(30, like=x, classes=10, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10))
    model.train()
    got = can.scores(model, chunk=7)
    with torch.no_grad():
        want = [float(torch.log_softmax(model(can.x[i:i + 1]).double(), -1)[0, int(can.y[i])])
                for i in range(30)]
    assert np.allclose(got, want, atol=1e-6) and model.training  # mode restored


def test_bad_counts_are_refused(digits):
    with pytest.raises(InvalidArgumentError, match="m=3"):
        InputCanaries.random(3, like=digits[0], classes=10)


def _train(x, y, private, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if private else 0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    eps = float("inf")
    if private:
        dp = swiftdp.make_private(model, opt, loader, target_epsilon=3.0, epochs=15,
                                  max_grad_norm=1.0, seed=seed)
        loader, opt = dp.data_loader, dp.optimizer
    for _ in range(15):
        for a, b in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(a), b).backward()
            opt.step()
    if private:
        eps = dp.epsilon(1e-5)
        dp.detach()
    return model, eps


def test_the_audit_sees_a_model_trained_without_privacy(digits):
    can = InputCanaries.random(400, like=digits[0], classes=10, seed=0)
    model, eps = _train(*can.insert(*digits), private=False, seed=0)
    r = can.audit(model, epsilon_claimed=eps)
    assert r.epsilon_lower_bound_fdp > 1.0 and not r.violated  # no claim to violate
    assert r.score == "input" and r.canaries == 400


@pytest.mark.parametrize("seed", [0, 1])
def test_a_private_run_stays_at_or_below_its_claim(digits, seed):
    can = InputCanaries.random(400, like=digits[0], classes=10, seed=seed)
    model, eps = _train(*can.insert(*digits), private=True, seed=seed)
    r = can.audit(model, epsilon_claimed=eps)
    assert eps == pytest.approx(3.0, abs=0.05)
    assert not r.violated, (r.epsilon_lower_bound_fdp, eps)


ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "256",
        "--seed", "0", "--quiet"]


def test_the_cli_trains_on_the_canaries_and_reports_the_bound(tmp_path):
    out = tmp_path / "run"
    assert main([*ARGS, "--audit-inputs", "200", "--out", str(out)]) == 0
    doc = json.loads((out / "privacy.json").read_text())
    a = doc["audit_inputs"]
    can = InputCanaries.random(200, like=load_dataset("digits", None).train.x, classes=10,
                               seed=0 + 0x5EED)
    train_size = len(load_dataset("digits", None).train)
    # The included canaries are ordinary training examples: N and q count them.
    assert doc["dataset_size"] == train_size + int(can.included.sum())
    assert doc["sampling"]["sample_rate"] == pytest.approx(256 / doc["dataset_size"])
    assert a["included"] == int(can.included.sum()) and a["canaries"] == 200
    assert a["violated"] is False and a["epsilon_claimed"] == pytest.approx(doc["epsilon"])
    assert "audit of the trained model (--audit-inputs)" in (out / "privacy.md").read_text()
    assert (out / "audit_inputs.png").stat().st_size > 1000
    assert json.loads((out / "audit_inputs.json").read_text())["score"] == "input"


def test_the_cli_refuses_input_canaries_where_they_do_not_fit(tmp_path, capsys):
    assert main([*ARGS, "--audit-inputs", "5", "--out", str(tmp_path / "a")]) == 2
    assert "--audit-inputs 5: needs at least 10" in capsys.readouterr().err
    assert main(["train", "--dataset", "text", "--epochs", "1", "--audit-inputs", "100",
                 "--out", str(tmp_path / "b")]) == 2
    assert "for the image datasets" in capsys.readouterr().err
