"""The training methods the benchmark compares, each as one full optimiser step.

Every method does the same work per step on the same in-memory batch:
``zero_grad``, forward, loss, backward and the optimiser update. The private
methods also clip per example, add Gaussian noise (σ = 1, C = 1) once and
divide by the expected batch size, and record the step in their accountant.

* ``nonprivate``: plain SGD on the unmodified model.
* ``swiftdp`` (the default, mode ``bk``) and ``swiftdp-<mode>``: :func:`swiftdp.make_private`
  around the unmodified model.
* ``swiftdp-layerwise`` / ``swiftdp-layerwise-end``: per-layer clipping
  (:func:`swiftdp.per_layer_thresholds`, one group per layer at ``C/√L``) in
  ``bk``, each group clipped during the backward as its gradients arrive, or
  all at the end (the per-example state held to the end, as flat clipping
  must): the pair shows what clipping inside the backward saves.
* ``opacus-<mode>``: Opacus 1.6 ``PrivacyEngine.make_private`` in
  ``hooks``, ``functorch`` or ``ghost`` mode, after ``ModuleValidator.fix``
  when Opacus' validator rejects the model (the replaced modules are noted).

The loss is the suite model's own (:attr:`SuiteModel.loss`; for the Hugging
Face rows the model's ``labels=`` loss). Only parameters with
``requires_grad`` are trained (LoRA: the adapters). A method that fails says
where (:attr:`MethodSetupError.where`): the innermost library frame, the
module being processed and, for Opacus, which per-sample gradients came out
with the wrong batch size.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp.bench.models import SuiteModel
from swiftdp.errors import InvalidArgumentError

SWIFTDP_METHODS: tuple[str, ...] = (
    "swiftdp", "swiftdp-bk", "swiftdp-ghost", "swiftdp-per_sample", "swiftdp-nanobatch",
    "swiftdp-layerwise", "swiftdp-layerwise-end",
)
# Per-layer clipping (one group per layer at C/√L, swiftdp.per_layer_thresholds) in bk:
# each layer clipped during the backward as its gradient arrives, or all at the end.
_LAYERWISE = {"swiftdp-layerwise": True, "swiftdp-layerwise-end": False}
OPACUS_METHODS: tuple[str, ...] = ("opacus-hooks", "opacus-functorch", "opacus-ghost")
METHODS: tuple[str, ...] = ("nonprivate", *SWIFTDP_METHODS, *OPACUS_METHODS)
DEFAULT_METHODS: tuple[str, ...] = (
    "nonprivate", "swiftdp", "swiftdp-ghost", "swiftdp-per_sample", "swiftdp-nanobatch",
    *OPACUS_METHODS,
)
BASELINE = "nonprivate"
LR = 1e-3
MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0

StepFn = Callable[[Tensor, Tensor], None]


class MethodUnavailableError(RuntimeError):
    """The method cannot run here (e.g. Opacus is not installed); not a failure of the method."""


class MethodSetupError(RuntimeError):
    """Wrapping the model failed after some notes were taken (e.g. after a module replacement).

    Attributes:
        notes: what happened before the failure.
        where: where it failed (library frame, module, offending parameters), or ``""``.
    """

    def __init__(self, cause: BaseException, notes: list[str], where: str = "") -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.notes = notes
        self.where = where


class MethodStepError(MethodSetupError):
    """A training step of a wrapped model failed (same attributes as :class:`MethodSetupError`)."""


@dataclass
class PreparedMethod:
    """A model ready to train with one method.

    Attributes:
        model: the model as the method trains it (Opacus: the wrapped module).
        step: one full training step on a batch ``(x, y)``.
        notes: what the table should say (module replacements, mode).
    """

    model: nn.Module
    step: StepFn
    notes: list[str] = field(default_factory=list)


def check_methods(methods: list[str]) -> None:
    """Raise :class:`InvalidArgumentError` naming any unknown method."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InvalidArgumentError(
            f"Unknown benchmark method(s) {bad}; expected names from {METHODS}."
        )


def opacus_available() -> bool:
    """Whether Opacus can be imported (the optional ``[bench]`` extra)."""
    return importlib.util.find_spec("opacus") is not None


def prepare(method: str, spec: SuiteModel, model: nn.Module, x: Tensor, y: Tensor) -> PreparedMethod:
    """Wrap ``model`` for ``method``; ``(x, y)`` is the batch it will train on.

    Args:
        method: a name from :data:`METHODS`.
        spec: the suite model (for the loss and the output layout).
        model: a freshly built model on its device, in training mode.
        x: the input batch.
        y: the targets.

    Returns:
        The :class:`PreparedMethod`.

    Raises:
        MethodUnavailableError: Opacus is not installed.
        MethodSetupError: wrapping failed after a module replacement (carries the notes).
        Exception: whatever the library raises while wrapping the model
            (callers record it as a failure).
    """
    check_methods([method])
    if method == BASELINE:
        return _nonprivate(spec, model)
    if method in _LAYERWISE:
        return _swiftdp(spec, model, "bk", x, y, default=False, in_backward=_LAYERWISE[method])
    if method.startswith("swiftdp"):
        mode = method.partition("-")[2] or "bk"
        return _swiftdp(spec, model, mode, x, y, default=method == "swiftdp")
    if not opacus_available():
        raise MethodUnavailableError(
            "Opacus is not installed; install the optional extra: pip install 'swiftdp[bench]'."
        )
    return _opacus(method.partition("-")[2], spec, model, x, y)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a method trains: those with ``requires_grad`` (LoRA: the adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def _nonprivate(spec: SuiteModel, model: nn.Module) -> PreparedMethod:
    opt = torch.optim.SGD(trainable(model), lr=LR)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        spec.loss(model, x, y).backward()
        opt.step()

    return PreparedMethod(model, step)


def _swiftdp(spec: SuiteModel, model: nn.Module, mode: str, x: Tensor, y: Tensor,
             default: bool, in_backward: bool | None = None) -> PreparedMethod:
    from swiftdp.api.private import make_private
    from swiftdp.clipping.groups import per_layer_thresholds

    opt = torch.optim.SGD(trainable(model), lr=LR)
    fixed: list[tuple[Tensor, Tensor]] = [(x, y)]
    # A fixed batch (timing needs the same work every step), handed out by
    # dp.data_loader as every DP step requires: the loader's own cost is one
    # index list and a collate that returns the prebuilt tensors.
    loader = DataLoader(_Indices(x.shape[0]), batch_size=x.shape[0],
                        collate_fn=lambda _: fixed[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False is deliberate
        dp = make_private(
            model, opt, loader, noise_multiplier=NOISE_MULTIPLIER, mode=mode, seed=0,
            poisson_sampling=False,
            max_grad_norm=MAX_GRAD_NORM if in_backward is None else per_layer_thresholds(
                model, MAX_GRAD_NORM),
        )
    notes = ["default: mode bk"] if default else []
    if in_backward is not None:
        dp.clipper.clip_groups_in_backward = in_backward
        groups = len(dp.clipper.group_limits or ())
        notes.append(f"{groups} groups, clipped {'in' if in_backward else 'after'} the backward")
    dp_opt = dp.optimizer
    batches = _forever(dp.data_loader)

    def step(xb: Tensor, yb: Tensor) -> None:
        fixed[0] = (xb, yb)
        xb, yb = next(batches)
        dp_opt.zero_grad(set_to_none=True)
        spec.loss(model, xb, yb).backward()
        dp_opt.step()

    return PreparedMethod(model, step, notes)


class _Indices(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def opacus_fix(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Run Opacus' ``ModuleValidator.fix`` only when its validator rejects ``model``.

    Returns:
        ``(model, notes)``: the (possibly replaced) model and one note per
        kind of replacement, e.g. ``"replaced 2 MultiheadAttention→DPMultiheadAttention"``.

    Raises:
        RuntimeError: the model is still invalid after the fix (with Opacus' reasons).
    """
    from opacus.validators import ModuleValidator

    if not ModuleValidator.validate(model, strict=False):
        return model, []
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    after = {n: type(m).__name__ for n, m in fixed.named_modules()}
    replaced = [n for n in before if n in after and before[n] != after[n]]
    top = [n for n in replaced if not any(n.startswith(r + ".") for r in replaced if r)]
    changes = Counter(f"{before[n]}→{after[n]}" for n in top)
    notes = [f"ModuleValidator.fix: {k} x{c}" for k, c in sorted(changes.items())]
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise RuntimeError("still invalid after ModuleValidator.fix: " + "; ".join(map(str, errors)))
    return fixed, notes


def _opacus(mode: str, spec: SuiteModel, model: nn.Module, x: Tensor, y: Tensor) -> PreparedMethod:
    from opacus import PrivacyEngine

    model, notes = opacus_fix(model)
    if mode == "hooks":
        notes += opacus_fallbacks(model)
    opt = torch.optim.SGD(trainable(model), lr=LR)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    engine = PrivacyEngine(accountant="rdp")
    kwargs: dict[str, Any] = dict(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode=mode,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "ghost":
                kwargs["criterion"] = nn.CrossEntropyLoss()
                gsm, dp_opt, criterion, _ = engine.make_private(**kwargs)
            else:
                gsm, dp_opt, _ = engine.make_private(**kwargs)
                criterion = None
    except Exception as exc:
        raise MethodSetupError(exc, notes, failure_site(exc, model, x.shape[0])) from exc

    def step(xb: Tensor, yb: Tensor) -> None:
        try:
            dp_opt.zero_grad(set_to_none=True)
            if criterion is None:
                loss = spec.loss(gsm, xb, yb)
            else:
                loss = spec.ghost_loss(gsm, xb, yb, criterion)
            loss.backward()
            dp_opt.step()
        except Exception as exc:
            raise MethodStepError(exc, notes, failure_site(exc, gsm, xb.shape[0])) from exc

    return PreparedMethod(gsm, step, notes)


def opacus_fallbacks(model: nn.Module) -> list[str]:
    """Notes on the layer types Opacus' ``hooks`` mode has no rule for (it runs vmap on them)."""
    from opacus.grad_sample import GradSampleModule

    kinds = Counter(
        type(m).__name__ for m in model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and type(m) not in GradSampleModule.GRAD_SAMPLERS
    )
    return [f"no Opacus hooks rule for {k} x{c} (functorch fallback)"
            for k, c in sorted(kinds.items())]


def failure_site(exc: BaseException, model: nn.Module | None, batch_size: int) -> str:
    """Where a method failed, for the results table.

    Args:
        exc: the exception.
        model: the model as the method wraps it (names are read from it), if known.
        batch_size: the batch the step ran on.

    Returns:
        ``"<file>:<line> in <function>"`` of the innermost frame of the
        library that raised (Opacus, swiftdp, transformers, peft, else the
        innermost frame), then the module that frame was processing (a local
        named ``module`` or ``layer``) and the parameters whose Opacus
        per-sample gradients (``p.grad_sample``) do not have ``batch_size`` rows.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    tb = exc.__traceback__
    locals_: list[dict[str, Any]] = []
    while tb is not None:
        locals_.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    parts: list[str] = []
    libs = ("opacus", "swiftdp", "transformers", "peft")
    lib_frames = [f for f in frames if any(f"{os.sep}{lib}{os.sep}" in f.filename for lib in libs)]
    if lib_frames or frames:
        frame = (lib_frames or frames)[-1]
        parts.append(f"{_short_path(frame.filename, libs)}:{frame.lineno} in {frame.name}")
    if model is None:
        return "; ".join(parts)
    names = {id(m): n for n, m in model.named_modules()}
    for scope in reversed(locals_):
        mod = next((scope[k] for k in ("module", "layer") if isinstance(scope.get(k), nn.Module)
                    and id(scope[k]) in names), None)
        if mod is not None:
            parts.append(f"module {_clean(names[id(mod)])} ({type(mod).__name__})")
            break
    odd = [(_clean(n), int(gs.shape[0])) for n, p in model.named_parameters()
           if isinstance(gs := getattr(p, "grad_sample", None), Tensor)
           and gs.dim() > 0 and gs.shape[0] != batch_size]
    if odd:
        shown = ", ".join(f"{n} ({b} row{'' if b == 1 else 's'})" for n, b in odd[:3])
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        parts.append(f"per-sample gradients without {batch_size} rows: {shown}{more}")
    return "; ".join(parts)


def _short_path(path: str, libs: tuple[str, ...]) -> str:
    parts = path.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in libs:
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


def _clean(name: str) -> str:
    """A parameter or module name without the wrappers' prefixes (``_module.``)."""
    return name.removeprefix("_module.") or "(root)"
