"""The input checks of swiftdp.checks: each caller's accepted range, named in the message."""

from __future__ import annotations

import math
import re

import pytest

from swiftdp.accounting import PrivacyAccountant
from swiftdp.checks import check_batch_dim, check_max_grad_norm, check_sample_rate
from swiftdp.errors import InvalidArgumentError
from swiftdp.sampling import PoissonBatchSampler


@pytest.mark.parametrize(("allow_zero", "interval"), [(True, "[0, 1]"), (False, "(0, 1]")])
def test_sample_rate_range_is_chosen_by_the_caller_and_named_in_the_message(allow_zero, interval):
    assert check_sample_rate(1, allow_zero=allow_zero) == 1.0
    assert check_sample_rate(0.04, allow_zero=allow_zero) == 0.04
    with pytest.raises(InvalidArgumentError, match=rf"sample_rate in {re.escape(interval)}, got 1.5"):
        check_sample_rate(1.5, allow_zero=allow_zero)
    if allow_zero:
        assert check_sample_rate(0.0, allow_zero=True) == 0.0
    else:
        with pytest.raises(InvalidArgumentError, match=r"sample_rate in \(0, 1\], got 0"):
            check_sample_rate(0, allow_zero=False)


def test_accountant_records_a_zero_rate_step_that_samplers_refuse():
    accountant = PrivacyAccountant("rdp")
    accountant.step(1.0, 0.0)
    assert len(accountant.history) == 1
    with pytest.raises(InvalidArgumentError, match=r"sample_rate in \(0, 1\], got 0.0"):
        PoissonBatchSampler(10, 0.0, 5)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "0", None])
def test_batch_dim_must_be_an_int_at_least_zero(bad):
    expected = f"batch_dim to be an int >= 0, got {bad!r}"
    with pytest.raises(InvalidArgumentError, match=re.escape(expected)):
        check_batch_dim(bad)


def test_batch_dim_is_returned_when_valid():
    assert check_batch_dim(0) == 0
    assert check_batch_dim(1) == 1


def test_max_grad_norm_allows_infinity_for_no_clipping():
    assert check_max_grad_norm(math.inf) == math.inf
    with pytest.raises(InvalidArgumentError, match="max_grad_norm > 0, got nan"):
        check_max_grad_norm(math.nan)
