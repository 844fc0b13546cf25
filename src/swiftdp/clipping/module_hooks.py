"""Module hooks that a deep copy of the module does not carry.

``copy.deepcopy(model)`` copies a module's hook dictionaries, and a hook that
is a bound method of the engine drags the engine along: its pending step
(autograd nodes that cannot be copied: ``TypeError`` between a forward and
its backward) or, before a forward, a second engine silently attached to the
copy. A copy of the private model (an EMA teacher, a snapshot for
evaluation) is a plain model: each engine hook is wrapped in
:class:`DroppedOnCopy`, whose deep copy does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


class DroppedOnCopy:
    """``fn`` as a module hook; in a deep copy of the module, a hook that does nothing."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _inert
