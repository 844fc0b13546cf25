"""The registry of layer rules: one explicit table from a torch function to its rule.

A rule is called instead of the torch function whenever one of the
function's arguments is a trainable parameter of a model under a
:class:`~swiftdp.clipping.engine.GradClipper`. It computes the function's
output with the parameters detached (so autograd never forms the non-private
weight gradient) and registers, through :meth:`Tracer.track`, a builder that
turns the output gradients into :class:`~swiftdp.clipping.contributions.Contribution`
objects. Rules never touch optimiser state or ``param.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swiftdp.clipping.tracer import Tracer

Rule = Callable[["Tracer", Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

RULES: dict[Any, Rule] = {}


def register(*funcs: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for each torch function in ``funcs``.

    Args:
        *funcs: torch functions as seen by ``__torch_function__``
            (``torch.nn.functional.linear``, ``torch.conv2d``, ...).

    Returns:
        A decorator that records the rule and returns it unchanged.
    """

    def deco(rule: Rule) -> Rule:
        for f in funcs:
            RULES[f] = rule
        return rule

    return deco


def bind(
    names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Map a call's positional and keyword arguments onto parameter names."""
    out = dict(defaults)
    for n, v in zip(names, args, strict=False):
        out[n] = v
    out.update(kwargs)
    return out
