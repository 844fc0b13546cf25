"""The update weights of the averages: the warmup schedule and the Polyak weights, by hand."""

from __future__ import annotations

import pytest

from swiftdp.averaging import ema_decay, update_weight


def test_ema_decay_warms_up_as_one_plus_t_over_ten_plus_t_then_stays_at_decay():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(8, 0.999) == pytest.approx(0.5)
    assert ema_decay(80, 0.999) == pytest.approx(0.9)
    assert ema_decay(8990, 0.999) == pytest.approx(0.999)  # (1 + t) / (10 + t) = 0.999 here
    assert ema_decay(10**6, 0.999) == 0.999
    assert ema_decay(0, 0.05) == 0.05  # a decay below the ramp is used from the start


def test_ema_decay_without_warmup_is_the_decay_at_every_step():
    assert {ema_decay(t, 0.9, warmup=False) for t in range(50)} == {0.9}


def test_update_weight_copies_until_start_step_then_follows_the_kind():
    assert [update_weight(n, start_step=3, decay=None) for n in range(1, 8)] == [
        1.0, 1.0, 1.0, 1.0, 1 / 2, 1 / 3, 1 / 4]
    ema = [update_weight(n, start_step=1, decay=0.99, warmup=True) for n in range(1, 5)]
    assert ema == pytest.approx([1.0, 1 - 1 / 10, 1 - 2 / 11, 1 - 3 / 12])
    assert update_weight(1, start_step=0, decay=0.99, warmup=False) == pytest.approx(0.01)
