"""The user-facing API: ``make_private`` and the settings of a private run."""

from swiftdp.api.config import PrivacySettings, SpeedSettings
from swiftdp.api.private import DPDataLoader, PrivateTraining, make_private

__all__ = ["DPDataLoader", "PrivacySettings", "PrivateTraining", "SpeedSettings", "make_private"]
