"""The empirical audit passes the real pipeline and catches broken ones."""

from __future__ import annotations

import swiftdp.clipping.step as step_mod
import swiftdp.optim.optimizer as optimizer_mod
from swiftdp.audit import audit_gaussian_step, epsilon_lower_bound


def test_lower_bound_of_identical_samples_is_zero():
    assert epsilon_lower_bound([0.0] * 50, [0.0] * 50, 1e-5) == 0.0


def test_real_pipeline_never_shows_more_privacy_loss_than_claimed():
    r = audit_gaussian_step(noise_multiplier=1.0, trials=250)
    assert not r.violated, r
    assert r.epsilon_lower_bound > 0.5  # the audit has power: the canary is visible


def test_audit_catches_noise_ten_times_too_small(monkeypatch):
    real = optimizer_mod.add_gaussian_noise

    def weak(params, std, generator):
        real(params, std / 10, generator)

    monkeypatch.setattr(optimizer_mod, "add_gaussian_noise", weak)
    r = audit_gaussian_step(noise_multiplier=1.0, trials=250)
    assert r.violated, r


def test_audit_catches_missing_clipping(monkeypatch):
    monkeypatch.setattr(step_mod, "clip_factors", lambda norms, c, style, **kw: norms.new_ones(norms.shape))
    r = audit_gaussian_step(noise_multiplier=1.0, trials=250)
    assert r.violated, r
