"""The clipping engine: exact per-example clipping in one backward pass."""

from swiftdp.clipping.clip_fns import CLIPPING_STYLES, clip_factors, sensitivity
from swiftdp.clipping.engine import MODES, GradClipper
from swiftdp.clipping.fix import fix

__all__ = ["CLIPPING_STYLES", "MODES", "GradClipper", "clip_factors", "fix", "sensitivity"]
