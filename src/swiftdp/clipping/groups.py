"""Group-wise clipping (He et al. 2022): thresholds per group of parameters, and their checks.

``max_grad_norm`` is one ``C``, ``{module-name prefix: C_k}`` (group-wise
clipping in one process) or ``[C_0, C_1, ...]`` with ``pipeline_stage=``
(:mod:`swiftdp.pipeline`). Each example's gradient restricted to group ``k``
is clipped to ``C_k`` with its own norm, so the sensitivity of the clipped sum
is ``√Σ_k C_k²`` (:meth:`swiftdp.settings.PrivacySettings.sensitivity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from swiftdp.checks import check_max_grad_norm
from swiftdp.clipping.clip_fns import Thresholds
from swiftdp.errors import InvalidArgumentError

__all__ = ["GroupPartition", "check_clip_thresholds", "check_group_partition", "per_layer_thresholds"]


class GroupPartition:
    """Which group each trainable parameter of ``model`` is clipped in.

    Args:
        model: the model whose parameters are grouped by name.
        thresholds: the groups, ``((prefix, C_k), ...)``.

    Raises:
        InvalidArgumentError: a trainable parameter is in no group or in two,
            or a group covers no trainable parameter.
    """

    def __init__(self, model: nn.Module, thresholds: tuple[tuple[str, float], ...]) -> None:
        self.model = model
        self.prefixes = [g for g, _ in thresholds]
        trainable: dict[int, Tensor] = {id(p): p for p in model.parameters() if p.requires_grad}
        self._cached = (tuple(trainable), check_group_partition(
            self._all_names(trainable), self.prefixes, every_group_used=True))

    def ids(self, trainable: dict[int, Tensor]) -> dict[int, int]:
        """The group index of each of ``trainable`` (by ``id``), checked when the set changes.

        Raises:
            InvalidArgumentError: a trainable parameter is in no group or in two.
        """
        key = tuple(trainable)
        if self._cached[0] != key:
            self._cached = (key, check_group_partition(self._all_names(trainable), self.prefixes))
        return self._cached[1]

    def _all_names(self, trainable: dict[int, Tensor]) -> dict[int, list[str]]:
        names: dict[int, list[str]] = {pid: [] for pid in trainable}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in names and n not in names[id(p)]:
                names[id(p)].append(n)
        return names


def check_clip_thresholds(value: Any, pipeline_stage: int | None = None) -> Thresholds:
    """Checks ``max_grad_norm``: one ``C``, group thresholds, or the thresholds of pipeline stages.

    Args:
        value: a number ``C``; a mapping ``{module-name prefix: C_k}`` (or the
            ``((prefix, C_k), ...)`` pairs ``PrivacySettings.max_grad_norm``
            holds) for group-wise clipping; with ``pipeline_stage``, a list
            ``[C_0, C_1, ...]``, one threshold per pipeline stage.
        pipeline_stage: this process' stage in a pipeline, or ``None``.

    Returns:
        ``C`` as a float, or the groups as ``((name, C_k), ...)`` in the
        given order (pipeline stages are named ``"stage 0"``, ``"stage 1"``, ...).

    Raises:
        InvalidArgumentError: naming the entry that is not a number > 0, an
            empty mapping, a list without ``pipeline_stage`` (or the reverse),
            or a stage outside the list.
    """
    if pipeline_stage is not None:
        if isinstance(pipeline_stage, bool) or not isinstance(pipeline_stage, int) or (
                pipeline_stage < 0):
            raise InvalidArgumentError(
                f"Expected pipeline_stage to be an int >= 0, got {pipeline_stage!r}: the index "
                "of this process' stage (0 for the stage that reads the inputs).")
        if not isinstance(value, Sequence) or isinstance(value, str) or not value or any(
                isinstance(c, tuple) for c in value):
            raise InvalidArgumentError(
                f"With pipeline_stage= make_private expects max_grad_norm=[C_0, C_1, ...], one "
                f"threshold per stage (the same list on every stage), got {value!r}. Each stage "
                "clips its own parameters to its own C_k; the noise is σ·√Σ_k C_k² on every stage.")
        if pipeline_stage >= len(value):
            raise InvalidArgumentError(
                f"Expected pipeline_stage < {len(value)} (max_grad_norm lists {len(value)} "
                f"stages), got pipeline_stage={pipeline_stage}.")
        return tuple((f"stage {k}", _threshold(c, f"max_grad_norm[{k}]"))
                     for k, c in enumerate(value))
    if isinstance(value, Mapping) or (isinstance(value, tuple) and value and all(
            isinstance(kv, tuple) and len(kv) == 2 for kv in value)):
        pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
        if not pairs:
            raise InvalidArgumentError(
                "Expected max_grad_norm={prefix: C_k, ...} with at least one group, got an empty "
                "mapping. Pass one number C, or a threshold per group of parameters.")
        names = [k for k, _ in pairs]
        if any(not isinstance(k, str) for k in names) or len(set(names)) != len(names):
            raise InvalidArgumentError(
                f"Expected the groups of max_grad_norm to be distinct module-name prefixes "
                f"(str), got {names!r}, e.g. {{'encoder': 1.0, 'head': 0.5}}.")
        return tuple((k, _threshold(c, f"max_grad_norm[{k!r}]")) for k, c in pairs)
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise InvalidArgumentError(
            f"Got max_grad_norm={value!r}, a list: one threshold per pipeline stage needs "
            "pipeline_stage= (see swiftdp.pipeline). For group-wise clipping in one process "
            "pass a mapping {module-name prefix: C_k}, e.g. {'encoder': 1.0, 'head': 0.5}.")
    return check_max_grad_norm(value)


def _threshold(value: Any, name: str) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
            or not math.isfinite(value)):
        raise InvalidArgumentError(
            f"Expected {name} > 0 and finite, got {value!r}. Pass the group's clipping "
            "threshold C_k, "
            "for example 1.0.")
    return float(value)


def check_group_partition(names: Mapping[int, Sequence[str]],
                          groups: Sequence[str], *, every_group_used: bool = False
                          ) -> dict[int, int]:
    """Checks that the groups of group-wise clipping partition the trainable parameters.

    A parameter named ``n`` is in group ``prefix`` when ``n == prefix`` or
    ``n`` starts with ``prefix + "."`` (``""`` covers every parameter). A
    parameter with several names (tied weights) is in the groups of all of
    them.

    Args:
        names: for each trainable parameter (by ``id``), its names in the model.
        groups: the group prefixes, in order.
        every_group_used: also refuse a group with no trainable parameter
            (a misspelt prefix: its ``C_k`` would only add noise).

    Returns:
        The group index of each parameter (by ``id``).

    Raises:
        InvalidArgumentError: a parameter is in no group or in two, naming it
            and the fix; or (``every_group_used``) a group matches nothing.
    """
    out: dict[int, int] = {}
    for pid, ns in names.items():
        hits = sorted({k for k, g in enumerate(groups) for n in ns
                       if g == "" or n == g or n.startswith(g + ".")})
        name = ns[0] if ns else "<a parameter without a name in the model>"
        also = f" (also named {', '.join(f'`{n}`' for n in ns[1:])}: tied)" if len(ns) > 1 else ""
        if not hits:
            raise InvalidArgumentError(
                f"Trainable parameter `{name}`{also} is in no group of max_grad_norm "
                f"(groups {list(groups)!r}): every trainable parameter must be clipped in "
                f"exactly one group. Add a group whose module-name prefix covers it (e.g. "
                f"'{name.rsplit('.', 1)[0]}': C), or freeze it with requires_grad_(False).")
        if len(hits) > 1:
            raise InvalidArgumentError(
                f"Trainable parameter `{name}`{also} is in {len(hits)} groups of max_grad_norm "
                f"({', '.join(repr(groups[k]) for k in hits)}): every trainable parameter must "
                "be clipped in exactly one group. Make the prefixes disjoint (drop or narrow "
                "one of them), or merge the groups.")
        out[pid] = hits[0]
    if every_group_used:
        for k, g in enumerate(groups):
            if k not in out.values():
                raise InvalidArgumentError(
                    f"The group {g!r} of max_grad_norm covers no trainable parameter: its "
                    "threshold would only add noise. Check the prefix against "
                    "model.named_parameters() (a module-name prefix such as 'encoder' or "
                    "'encoder.layer.0'), or remove the group.")
    return out


def per_layer_thresholds(model: nn.Module, max_grad_norm: float) -> dict[str, float]:
    """One group per layer, thresholds ``C/√K`` each: per-layer clipping with sensitivity ``C``.

    A layer is a module that holds trainable parameters itself; its group is
    its name (all its own parameters together). Where a name would also cover
    another layer's parameters (a module with parameters of its own *and*
    layers inside, the root module) or a tied parameter already grouped, the
    module's own parameters are grouped one by one under their full names. A
    tied parameter is clipped once, in the first layer that holds it. Pass the
    result as ``max_grad_norm=`` (or scale its values: each ``C_k`` is the
    group's own threshold, the sensitivity is ``√Σ_k C_k²``).

    Args:
        model: the model.
        max_grad_norm: the total ``C``: each of the ``K`` layers gets ``C/√K``.

    Returns:
        ``{prefix: C_k}``, in the order of ``model.named_modules()``.

    Raises:
        InvalidArgumentError: ``max_grad_norm`` is not a positive number, or
            the model has no trainable parameter.

    Example:
        >>> per_layer_thresholds(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), 1.0)
        {'0': 0.7071067811865475, '1': 0.7071067811865475}
    """
    c = _threshold(max_grad_norm, "max_grad_norm")
    modules = dict(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    groups: list[str] = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)
               if p.requires_grad and id(p) not in seen]
        if not own:
            continue
        full = [f"{name}.{n}" if name else n for n, _ in own]
        whole = (name != "" and len(own) == len(list(module.parameters(recurse=False)))
                 and not any(p.requires_grad for m in module.children()
                             for p in m.parameters())
                 and not _covers_another(name, modules, module))
        groups.extend([name] if whole else full)
        seen.update(id(p) for _, p in own)
    if not groups:
        raise InvalidArgumentError(
            "per_layer_thresholds found no trainable parameter in the model: unfreeze the "
            "parameters to train (requires_grad_(True)) first.")
    ck = c / math.sqrt(len(groups))
    return dict.fromkeys(groups, ck)


def _covers_another(name: str, modules: Mapping[str, nn.Module], module: nn.Module) -> bool:
    """Whether ``name`` as a prefix also names another module (a duplicate path to a shared one)."""
    return any(other is not module and (n == name or n.startswith(name + "."))
               for n, other in modules.items())
