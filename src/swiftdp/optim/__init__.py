"""Noise and the DP optimizer wrapper."""

from swiftdp.optim.noise import add_gaussian_noise, make_noise_generator
from swiftdp.optim.optimizer import DPOptimizer, StepState

__all__ = ["DPOptimizer", "StepState", "add_gaussian_noise", "make_noise_generator"]
