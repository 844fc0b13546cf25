"""swiftdp: fast, exact differentially private training for PyTorch."""

from swiftdp.api import PrivacySettings, PrivateTraining, SpeedSettings, make_private
from swiftdp.clipping import GradClipper, clip_factors, fix, sensitivity
from swiftdp.errors import (
    CheckpointError,
    InvalidArgumentError,
    PrivacyBudgetExceededError,
    SwiftDPError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GradClipper",
    "InvalidArgumentError",
    "PrivacyBudgetExceededError",
    "PrivacySettings",
    "PrivateTraining",
    "SpeedSettings",
    "SwiftDPError",
    "UnsupportedModuleError",
    "clip_factors",
    "fix",
    "make_private",
    "sensitivity",
]
