"""An average of a model's parameters over training steps, for evaluation and release.

:class:`ParameterAverage` keeps an exponential moving average (EMA) or a
Polyak running mean of a model's trainable parameters, updated after each
optimizer step, and swaps it into the model for evaluation
(:meth:`~ParameterAverage.applied`). De et al. (2022) evaluate DP-SGD with
such an average; :mod:`swiftdp.averaging.schedule` gives the update rule.

Privacy: the average is post-processing and costs no privacy. It reads
only the values of the model's parameters (and, with
``include_buffers=True``, its buffers), never their gradients: under
:func:`swiftdp.make_private` the parameters change only in the DP optimizer's
step, so every value read is one of the privately released iterates
θ_0, θ_1, …, θ_n (θ_0 the initialisation, independent of the data), and the
guarantee the accountant reports covers the whole sequence, hence any
function of it. (``p.grad`` between backward and step holds the noise-free
sum of clipped gradients; this class never touches it.) Buffers are as
private as the model's own: swiftdp refuses modules that compute buffers
from the batch (BatchNorm, instance norms with running statistics).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from swiftdp.averaging.schedule import update_weight
from swiftdp.checks import check_averaging_kind, check_decay, check_flag, check_steps
from swiftdp.errors import CheckpointError, InvalidArgumentError

__all__ = ["DEFAULT_DECAY", "STATE_FORMAT", "STATE_VERSION", "ParameterAverage"]

DEFAULT_DECAY = 0.999
STATE_FORMAT = "swiftdp-parameter-average"
STATE_VERSION = 1
_SETTINGS = ("kind", "decay", "warmup", "start_step", "include_buffers")


class ParameterAverage:
    """An EMA or Polyak average of ``model``'s trainable parameters.

    Call :meth:`update` once per optimizer step, after the step; evaluate or
    export the average with :meth:`applied` or :meth:`averaged_state_dict`;
    resume it with :meth:`state_dict` / :meth:`load_state_dict`. The average
    starts as a copy of the parameters at construction (θ_0). The ``n``-th
    update (θ_n: the parameters after ``n`` steps) does
    ``average ← average + w · (θ_n − average)`` with (``t = n − start_step − 1``):

    * ``t < 0``: ``w = 1``, a copy: averaging has not started;
    * ``kind="ema"``: ``w = 1 − min(decay, (1 + t) / (10 + t))`` with
      ``warmup`` (the default, as in De et al. 2022), ``w = 1 − decay``
      without: then θ_{start_step} keeps weight ``decay^(t+1)``;
    * ``kind="polyak"``: ``w = 1 / (t + 1)``: the mean of θ_{start_step+1}, …, θ_n.

    Averaged are the parameters with ``requires_grad`` at construction
    (frozen ones do not change, so their average is themselves). Averages of
    bf16/fp16 parameters are held and accumulated in float32, others in
    their own dtype (float32, float64). Privacy: post-processing of the
    released parameters, no privacy cost (see the module docstring).

    With gradient accumulation (``max_physical_batch_size``) ``optimizer.step()``
    runs once per physical chunk: update only when a logical step completed
    (``dp.steps`` grew). In a process group every rank holds the same
    parameters and so the same average.

    Args:
        model: the model whose parameters are averaged (``dp.model``).
        decay: the EMA's decay μ in ``[0, 1)``, default :data:`DEFAULT_DECAY`
            (0.999: roughly the last 1000 steps); ``kind="ema"`` only.
        kind: ``"ema"`` or ``"polyak"``.
        warmup: ramp the EMA's decay up as ``min(decay, (1 + t) / (10 + t))``;
            default True; ``kind="ema"`` only.
        start_step: the updates ``1, …, start_step`` only copy the parameters;
            averaging starts with the update after.
        include_buffers: also average the model's floating-point buffers (and
            copy its other buffers, such as counters, at each update), and swap
            them in :meth:`applied`. By default buffers are left as they are.
        device: where the averages live (``"cpu"`` to save accelerator memory);
            by default beside each parameter.

    Raises:
        InvalidArgumentError: an argument is out of range or of the wrong type,
            ``decay`` or ``warmup`` is given with ``kind="polyak"``, or the model
            has no trainable parameter.

    References:
        De, Berrada, Hayes, Smith, Balle. Unlocking high-accuracy differentially
        private image classification through scale. arXiv:2204.13650, 2022.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> avg = ParameterAverage(model, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)    # stands for an optimizer step
        >>> avg.update()
        >>> with avg.applied():
        ...     pass                          # evaluate the averaged model here
        >>> avg.num_updates
        1
    """

    def __init__(self, model: nn.Module, decay: float | None = None, *, kind: str = "ema",
                 warmup: bool | None = None, start_step: int = 0, include_buffers: bool = False,
                 device: torch.device | str | None = None) -> None:
        check_averaging_kind(kind)
        if kind == "polyak":
            for name, value in (("decay", decay), ("warmup", warmup)):
                if value is not None:
                    raise InvalidArgumentError(
                        f"`{name}` is an EMA setting, got {name}={value!r} with kind='polyak'. "
                        f"A Polyak average weighs every step from start_step on equally: drop "
                        f"`{name}`, or pass kind='ema'.")
        else:
            decay = check_decay(DEFAULT_DECAY if decay is None else decay)
            warmup = check_flag(True if warmup is None else warmup, name="warmup")
        self._kind = kind
        self._decay = decay
        self._warmup = warmup
        self._start_step = check_steps(start_step, name="start_step")
        self._include_buffers = check_flag(include_buffers, name="include_buffers")
        self._model = model
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise InvalidArgumentError(
                f"`model` ({type(model).__name__}) has no parameter with requires_grad=True, so "
                "there is nothing to average. Pass the model being trained.")
        if include_buffers:
            self._names += [name for name, _ in model.named_buffers()]
        self._averages: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, t in self._tracked().items():
                self._averages[name] = t.detach().to(
                    device=t.device if device is None else device,
                    dtype=_accumulation_dtype(t.dtype), copy=True)
        self._num_updates = 0
        self._applied = False

    # -- settings and counters ---------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model whose parameters are averaged."""
        return self._model

    @property
    def kind(self) -> str:
        """``"ema"`` or ``"polyak"``."""
        return self._kind

    @property
    def decay(self) -> float | None:
        """The EMA's decay (``None`` for Polyak)."""
        return self._decay

    @property
    def warmup(self) -> bool | None:
        """Whether the EMA's decay ramps up (``None`` for Polyak)."""
        return self._warmup

    @property
    def start_step(self) -> int:
        """Updates ``1, …, start_step`` only copy the parameters."""
        return self._start_step

    @property
    def include_buffers(self) -> bool:
        """Whether buffers are averaged and swapped too."""
        return self._include_buffers

    @property
    def num_updates(self) -> int:
        """How many times :meth:`update` has been called (restored by :meth:`load_state_dict`)."""
        return self._num_updates

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _SETTINGS)
        return (f"ParameterAverage({settings}, tensors={len(self._names)}, "
                f"num_updates={self._num_updates})")

    # -- averaging ---------------------------------------------------------------

    def update(self) -> None:
        """Fold the model's current parameters in; call once after each optimizer step.

        Reads parameter (and buffer) values only, never gradients.

        Raises:
            InvalidArgumentError: called inside :meth:`applied` (the model holds
                the average there), or the model no longer has a tensor this
                average was built for, or its shape changed.
        """
        if self._applied:
            raise InvalidArgumentError(
                "`update()` was called inside `applied()`, where the model holds the averaged "
                "weights, not the trained ones. Call it after the optimizer step, outside "
                "`applied()`.")
        live = self._tracked()
        weight = update_weight(self._num_updates + 1, start_step=self._start_step,
                               decay=self._decay, warmup=bool(self._warmup))
        with torch.no_grad():
            for name, t in live.items():
                average = self._averages[name]
                new = t.detach().to(device=average.device, dtype=average.dtype)
                if weight == 1.0 or not (average.is_floating_point() or average.is_complex()):
                    average.copy_(new)
                else:
                    average.lerp_(new, weight)
        self._num_updates += 1

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Swap the average into the model for the ``with`` body, then restore the trained weights.

        The trained weights are copied aside and written back bit for bit
        when the body ends, also when it raises. The averages are cast to the
        parameters' dtype (bf16 parameters get the float32 average rounded).
        The model's train/eval mode is left as it is; the parameters are
        changed in place, so anything holding them (optimizer, hooks) sees
        the average inside the body.

        Yields:
            The model, holding the averaged weights.

        Raises:
            InvalidArgumentError: already inside :meth:`applied`, or the model
                no longer has a tensor this average was built for.

        Example:
            ``with avg.applied() as model: accuracy = evaluate(model)``
        """
        if self._applied:
            raise InvalidArgumentError(
                "`applied()` is already active: the model holds the averaged weights. "
                "Do not nest `with avg.applied():` blocks.")
        live = self._tracked()
        with torch.no_grad():
            trained = {name: t.detach().clone() for name, t in live.items()}
        self._applied = True
        try:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(self._averages[name])
            yield self._model
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(trained[name])
            self._applied = False

    def averaged_state_dict(self) -> dict[str, Any]:
        """The model's ``state_dict`` with the averages in place of the trained values.

        For release: ``model.load_state_dict(avg.averaged_state_dict())``
        gives the averaged model. Averaged entries are new tensors in the
        model's dtypes and on its devices (tied weights appear under each of
        their names); the other entries are the model's own, as
        ``model.state_dict()`` returns them.

        Returns:
            A dict with the keys of ``model.state_dict()``.
        """
        state = self._model.state_dict()
        aliases = _aliases(self._model)
        for key, value in state.items():
            name = aliases.get(key)
            if name in self._averages and isinstance(value, Tensor):
                state[key] = self._averages[name].to(device=value.device, dtype=value.dtype,
                                                     copy=True)
        return state

    # -- resuming ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies) of the averages, the update count and the settings.

        It holds tensors and plain values only, so it can go into a
        checkpoint's ``extra``: ``dp.save_checkpoint(path, extra={"average":
        avg.state_dict()})``.

        Returns:
            ``{"format", "version", "kind", "decay", "warmup", "start_step",
            "include_buffers", "num_updates", "averages": {name: tensor}}``.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **{k: getattr(self, k) for k in _SETTINGS},
            "num_updates": self._num_updates,
            "averages": {name: a.detach().clone() for name, a in self._averages.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; everything is checked before anything changes.

        The averages are copied into this object's tensors (so onto its
        device and accumulation dtype); the next :meth:`update` continues
        exactly where the saved average stopped.

        Args:
            state: a dict returned by :meth:`state_dict`.

        Raises:
            CheckpointError: ``state`` is not a ParameterAverage state, was
                saved with other settings (``kind``, ``decay``, ...), or for
                another model: the message names the missing, unexpected and
                mis-shaped tensors.
        """
        averages = self._checked(state)
        with torch.no_grad():
            for name, saved in averages.items():
                self._averages[name].copy_(saved)
        self._num_updates = int(state["num_updates"])

    def _checked(self, state: Mapping[str, Any]) -> Mapping[str, Tensor]:
        """The averages of ``state`` once it is known to fit this object (changes nothing)."""
        if (not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT
                or not isinstance(state.get("averages"), Mapping)):
            raise CheckpointError(
                f"Expected a ParameterAverage.state_dict() (format {STATE_FORMAT!r}), got "
                f"{_describe(state)}. Pass the dict that `state_dict()` returned.")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"The ParameterAverage state has version {state.get('version')!r}; this swiftdp "
                f"reads version {STATE_VERSION}. Load it with the swiftdp version that saved it.")
        diffs = [f"{k}: saved {state.get(k)!r} vs now {getattr(self, k)!r}" for k in _SETTINGS
                 if state.get(k) != getattr(self, k)]
        if diffs:
            raise CheckpointError(
                f"The ParameterAverage state was saved with other settings ({'; '.join(diffs)}). "
                "Build the ParameterAverage as the one that saved it.")
        count = state.get("num_updates")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CheckpointError(
                f"The ParameterAverage state's num_updates is {count!r}, not an int >= 0: "
                "it is damaged. Use another checkpoint.")
        averages: Mapping[str, Any] = state["averages"]
        missing = [n for n in self._names if n not in averages]
        unexpected = [n for n in averages if n not in self._averages]
        wrong = [f"{n}: saved {_describe(v)} vs model {tuple(self._averages[n].shape)}"
                 for n, v in averages.items() if n in self._averages
                 and (not isinstance(v, Tensor) or v.shape != self._averages[n].shape)]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"The ParameterAverage state does not match the model ({type(self._model).__name__}"
                f"): missing {missing}, unexpected {unexpected}, shapes {wrong}. Build the same "
                "model (same trainable parameters) as the run that saved it.")
        return averages

    def _tracked(self) -> dict[str, Tensor]:
        """The model's tensors this average follows, by name; refuses a changed model."""
        found: dict[str, Tensor] = dict(self._model.named_parameters())
        if self._include_buffers:
            found.update(self._model.named_buffers())
        missing = [n for n in self._names if n not in found]
        reshaped = [f"{n}: now {tuple(found[n].shape)} vs average {tuple(a.shape)}"
                    for n, a in self._averages.items()
                    if n in found and found[n].shape != a.shape]
        if missing or reshaped:
            raise InvalidArgumentError(
                f"The model ({type(self._model).__name__}) no longer matches this "
                f"ParameterAverage: missing {missing}, shapes {reshaped}. Build the average "
                "after the model's final structure is set (after swiftdp.fix, adapters).")
        return {n: found[n] for n in self._names}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 (and other low-precision floats), else the dtype itself."""
    if dtype.is_floating_point or dtype.is_complex:
        return torch.promote_types(dtype, torch.float32)
    return dtype


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every ``state_dict`` name of a parameter or buffer -> the name it is tracked under.

    Tied tensors (one ``Parameter`` under two module paths) are tracked under
    their first name, the one ``named_parameters()`` gives.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        aliases[name] = first.setdefault(id(t), name)
    return aliases


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
