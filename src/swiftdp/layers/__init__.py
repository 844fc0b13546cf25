"""Layer rules, one file per layer family, each registered in :mod:`registry`.

:func:`load_builtin_rules` imports every rule file (done by the engine).
"""

from swiftdp.layers.registry import RULES, register


def load_builtin_rules() -> None:
    """Import the built-in rule files, which register themselves in ``RULES``."""
    import swiftdp.layers.builtin  # noqa: F401


__all__ = ["RULES", "load_builtin_rules", "register"]
