"""Imports every built-in layer rule so that it registers itself."""

from swiftdp.layers import (  # noqa: F401
    attention,
    conv,
    embedding,
    linear,
    norm,
    recurrent,
)
