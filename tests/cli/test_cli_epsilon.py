"""`swiftdp epsilon` against external reference values (BRIEF.md)."""

from __future__ import annotations

import pytest

from swiftdp.accounting import PrivacyAccountant
from swiftdp.cli.main import main

PLAN = ["--batch-size", "256", "--dataset-size", "60000", "--epochs", "60", "--delta", "1e-5"]


def _values(out: str) -> dict[str, str]:
    return {line[:12].strip(): line[12:].strip() for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize(("accountant", "expected"), [("pld", 2.381779), ("rdp", 2.596656)])
def test_epsilon_matches_reference_values(accountant, expected, capsys):
    assert main(["epsilon", "--sigma", "1.1", *PLAN, "--accountant", accountant]) == 0
    values = _values(capsys.readouterr().out)
    assert values["steps"] == "14063"
    assert float(values["epsilon"]) == pytest.approx(expected, abs=2e-6)


def test_sample_rate_and_steps_give_the_same_epsilon(capsys):
    assert main(["epsilon", "--sigma", "1.3", "--sample-rate", "0.0025", "--steps", "6000",
                 "--accountant", "rdp"]) == 0
    assert float(_values(capsys.readouterr().out)["epsilon"]) == pytest.approx(0.724223, abs=2e-6)


def test_target_epsilon_prints_a_sigma_that_meets_it(capsys):
    assert main(["epsilon", "--target-epsilon", "8", "--sample-rate", "0.04", "--epochs", "90",
                 "--accountant", "rdp"]) == 0
    values = _values(capsys.readouterr().out)
    sigma = float(values["sigma"])
    assert sigma == pytest.approx(1.41587, abs=2e-3)
    acct = PrivacyAccountant("rdp")
    acct.step(sigma, 0.04, 2250)
    assert acct.epsilon(1e-5) <= 8.0
