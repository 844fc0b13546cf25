"""swiftdp: fast, exact differentially private training for PyTorch."""

from swiftdp.api import PrivacySettings, PrivateTraining, SpeedSettings, make_private
from swiftdp.averaging import ParameterAverage
from swiftdp.clipping import GradClipper, clip_factors, fix, sensitivity
from swiftdp.clipping.groups import per_layer_thresholds
from swiftdp.errors import (
    CheckpointError,
    InvalidArgumentError,
    PrivacyBudgetExceededError,
    SwiftDPError,
    UnsupportedModuleError,
)
from swiftdp.optim.schedules import ExponentialSchedule, StepSchedule
from swiftdp.settings import AdaptiveClipping

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipping",
    "CheckpointError",
    "ExponentialSchedule",
    "GradClipper",
    "InvalidArgumentError",
    "ParameterAverage",
    "PrivacyBudgetExceededError",
    "PrivacySettings",
    "PrivateTraining",
    "SpeedSettings",
    "StepSchedule",
    "SwiftDPError",
    "UnsupportedModuleError",
    "clip_factors",
    "fix",
    "make_private",
    "per_layer_thresholds",
    "sensitivity",
]
