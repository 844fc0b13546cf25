"""The user-facing API: ``make_private`` and the settings of a private run."""

from swiftdp.api.private import DPDataLoader, PrivateTraining, make_private
from swiftdp.settings import PrivacySettings, SpeedSettings

__all__ = ["DPDataLoader", "PrivacySettings", "PrivateTraining", "SpeedSettings", "make_private"]
