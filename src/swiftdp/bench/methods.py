"""The training methods the benchmark compares, each as one full optimiser step.

Every method does the same work per step on the same in-memory batch:
``zero_grad``, forward, loss, backward and the optimiser update. The private
methods also clip per example, add Gaussian noise (σ = 1, C = 1) once and
divide by the expected batch size, and record the step in their accountant.

* ``nonprivate``: plain SGD on the unmodified model.
* ``swiftdp`` (the default, mode ``bk``) and ``swiftdp-<mode>``: :func:`swiftdp.make_private`
  around the unmodified model.
* ``opacus-<mode>``: Opacus 1.6 ``PrivacyEngine.make_private`` in
  ``hooks``, ``functorch`` or ``ghost`` mode, after ``ModuleValidator.fix``
  when Opacus' validator rejects the model (the replaced modules are noted).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from swiftdp.bench.models import SuiteModel, suite_loss
from swiftdp.errors import InvalidArgumentError

SWIFTDP_METHODS: tuple[str, ...] = (
    "swiftdp", "swiftdp-bk", "swiftdp-ghost", "swiftdp-per_sample", "swiftdp-nanobatch"
)
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
    """

    def __init__(self, cause: BaseException, notes: list[str]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.notes = notes


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
        return _nonprivate(model)
    if method.startswith("swiftdp"):
        mode = method.partition("-")[2] or "bk"
        return _swiftdp(model, mode, x, y, default=method == "swiftdp")
    if not opacus_available():
        raise MethodUnavailableError(
            "Opacus is not installed; install the optional extra: pip install 'swiftdp[bench]'."
        )
    return _opacus(method.partition("-")[2], spec, model, x, y)


def _nonprivate(model: nn.Module) -> PreparedMethod:
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        suite_loss(model(x), y).backward()
        opt.step()

    return PreparedMethod(model, step)


def _swiftdp(model: nn.Module, mode: str, x: Tensor, y: Tensor, default: bool) -> PreparedMethod:
    from swiftdp.api.private import make_private

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fixed: list[tuple[Tensor, Tensor]] = [(x, y)]
    # A fixed batch (timing needs the same work every step), handed out by
    # dp.data_loader as every DP step requires: the loader's own cost is one
    # index list and a collate that returns the prebuilt tensors.
    loader = DataLoader(_Indices(x.shape[0]), batch_size=x.shape[0],
                        collate_fn=lambda _: fixed[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False is deliberate
        dp = make_private(
            model, opt, loader, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=NOISE_MULTIPLIER,
            mode=mode, seed=0, poisson_sampling=False,
        )
    dp_opt = dp.optimizer
    batches = _forever(dp.data_loader)

    def step(xb: Tensor, yb: Tensor) -> None:
        fixed[0] = (xb, yb)
        xb, yb = next(batches)
        dp_opt.zero_grad(set_to_none=True)
        suite_loss(model(xb), yb).backward()
        dp_opt.step()

    return PreparedMethod(model, step, ["default: mode bk"] if default else [])


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
    opt = torch.optim.SGD(model.parameters(), lr=LR)
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
        raise MethodSetupError(exc, notes) from exc

    def step(xb: Tensor, yb: Tensor) -> None:
        dp_opt.zero_grad(set_to_none=True)
        out = gsm(xb)
        if criterion is None:
            loss = suite_loss(out, yb)
        elif spec.sequence_output:
            loss = criterion(out.reshape(-1, out.shape[-1]), yb.reshape(-1), shape=yb.shape)
        else:
            loss = criterion(out, yb)
        loss.backward()
        dp_opt.step()

    return PreparedMethod(gsm, step, notes)
