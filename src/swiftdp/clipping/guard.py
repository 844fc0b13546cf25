"""The independence check: refuse models whose output for one example depends on others.

DP-SGD bounds each example's influence by clipping its gradient, which
assumes that gradient depends on that example alone. A model that mixes the
examples of a batch (``x - x.mean(0)``, functional batch norm, attention or
``torch.roll`` across the batch, a Python ``if`` on a batch statistic, a buffer
updated from the batch) breaks that assumption without any layer rule
noticing. :class:`IndependenceCheck` tests it directly: before the first
training forward of each input signature it runs the model again with one
example replaced and requires the other examples' outputs to stay the same.

References:
    Abadi et al. Deep learning with differential privacy. CCS 2016.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from swiftdp.checks import check_batch_dim
from swiftdp.clipping.backward_probe import FIX as _FIX
from swiftdp.clipping.backward_probe import check_backward
from swiftdp.clipping.compare import tree_unchanged, unchanged
from swiftdp.clipping.hook_check import check_no_backward_hooks
from swiftdp.clipping.module_hooks import DroppedOnCopy
from swiftdp.clipping.views import merge_views, split_views
from swiftdp.errors import ExampleMixingError

if TYPE_CHECKING:
    from swiftdp.clipping.engine import GradClipper

MAX_SIGNATURES = 1024
"""How many probed input signatures are remembered (oldest forgotten first)."""


_Event = tuple[str, str, str | None, Any]  # (kind "in"/"out", module path, enclosing path, value)


class IndependenceCheck:
    """Refuse, before training on it, a model whose output for one example depends on another.

    A forward pre-hook on the model root (run before the engine's own hook)
    probes each new *input signature* (pytree structure, shapes, dtypes and
    devices of the tensor leaves, values of ``str``/``bool``/``None`` leaves)
    of a training forward (``model.training``, grad enabled, engine not
    suspended): under ``torch.no_grad()`` and ``clipper.suspended()`` it runs
    the model on a copy of the inputs, then once with example ``j`` replaced,
    for ``j`` the first and the last example. Float tensors carrying the batch
    get row ``j`` replaced by ``randn · (10·max|x| + 1)``, integer tensors by
    another row's values; bool tensors and tensors without the batch are left
    alone. Every run starts from the same RNG and buffer state, so dropout
    masks match. The check passes when, for every output tensor, the other
    examples' slices are unchanged (within ``REL_TOL`` of the output's scale),
    an output without a batch dimension is unchanged, and no buffer ends the
    forward with a value that depends on example ``j``.

    Guarantee: for the probed batch, with the current parameters, changing
    example 0 or example ``B-1`` (each to one random value) changes no other
    example's output and no buffer. It is a test, not a proof: mixing that
    only shows for other data, other parameters, other examples, or below
    ``REL_TOL``, is not caught.

    Cost: three extra forwards without gradient (one reference, one per probed
    example) on each new input signature, plus a copy of the inputs and of
    all buffers; nothing on later batches of a probed signature. Forward
    hooks recording every module's inputs and outputs are attached only after
    a failure, to name the module (two more forwards).

    The RNG streams are untouched: CPU and CUDA generator states (and Python's
    and NumPy's global ones) are restored after the probe, so the real
    forward draws exactly what it would have drawn without the check.
    Buffers are restored too.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> clipper = GradClipper(model, max_grad_norm=1.0)
        >>> check = IndependenceCheck(model, clipper)
        >>> model(torch.randn(8, 4)).sum().backward()  # probed, passes
        >>> check.remove()

    Args:
        model: the model; a forward pre-hook is attached to its root and
            removed by :meth:`remove`.
        clipper: the :class:`~swiftdp.clipping.engine.GradClipper` attached
            to ``model``; its ``suspended()`` keeps the probes out of the
            engine.
        batch_dim: the batch dimension of inputs with two or more dimensions
            (``1`` for ``(T, B, ...)`` inputs); 1-D tensors carry the batch
            on dimension 0, as in the engine.

    Raises:
        InvalidArgumentError: ``batch_dim`` is not an int >= 0.
        ExampleMixingError: (from the model's forward) the probe found mixing;
            the message names the module where it first appears, or the
            buffer updated from the batch, and the fix.
    """

    def __init__(self, model: nn.Module, clipper: GradClipper, *, batch_dim: int = 0) -> None:
        self.model = model
        self.clipper = clipper
        self.batch_dim = check_batch_dim(batch_dim)
        self.probed: dict[Hashable, None] = {}  # an ordered set of signatures
        self._state_checked: set[Hashable] = set()  # signatures probed at a batch of one
        self._depth = 0
        self._probing = False
        self._handles = [
            model.register_forward_pre_hook(DroppedOnCopy(self._pre), with_kwargs=True,
                                            prepend=True),
            model.register_forward_hook(DroppedOnCopy(self._post), with_kwargs=True,
                                        always_call=True),
        ]

    def remove(self) -> None:
        """Detach the check from the model (hooks removed, model untouched)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ----------------------------------------------------------------- hooks
    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth += 1
        if self._depth > 1 or self._probing:  # a recursive root call, or our own probe
            return
        # Any forward with gradient is probed, in eval mode too: a model can be
        # trained privately with dropout off.
        if not torch.is_grad_enabled() or _suspended(self.clipper):
            return
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # The batch size is left out of the signature: Poisson sampling changes
        # it at every step, and mixing does not depend on it.
        batch = _batch_size(leaves, self.batch_dim)
        # The trainable set too: a layer unfrozen later is probed (its use may mix).
        trainable = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        sig = (spec, tuple(_leaf_signature(x, _input_axis(x, batch, self.batch_dim))
                           for x in leaves), trainable)
        if sig in self.probed or batch < 1:
            return
        if batch == 1:
            # A batch of one cannot show mixing between examples, but it can show
            # state written from the data (buffers, parameters): checked once per
            # signature; the full probe waits for a larger batch of that signature.
            if sig not in self._state_checked:
                self.check(args, kwargs)
                self._state_checked.add(sig)
            return
        self.check(args, kwargs)
        self.probed[sig] = None
        if len(self.probed) > MAX_SIGNATURES:
            del self.probed[next(iter(self.probed))]

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._depth -= 1

    # ----------------------------------------------------------------- probe
    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Probe the model on these inputs now, whatever the cache says.

        Args:
            args: the positional arguments of ``model(...)``.
            kwargs: its keyword arguments.

        Raises:
            ExampleMixingError: another example's output, or a buffer,
                depends on the replaced example.
        """
        leaves, spec = pytree.tree_flatten((args, kwargs))
        batch = _batch_size(leaves, self.batch_dim)
        axes = [_input_axis(x, batch, self.batch_dim) for x in leaves]
        if batch < 1 or all(a is None for a in axes):
            return
        check_no_backward_hooks(self.model)  # the specific refusal before the backward probe's
        probe = _Probe(self.model, spec, leaves, axes, batch, getattr(self.clipper, "augmult", 1))
        self._probing = True
        try:
            with torch.no_grad(), self.clipper.suspended():
                probe.run()
        finally:
            probe.restore()
            self._probing = False

    def __enter__(self) -> IndependenceCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Probe:
    """One probe: the saved state, the reference run and the perturbed runs."""

    def __init__(
        self,
        model: nn.Module,
        spec: pytree.TreeSpec,
        leaves: list[Any],
        axes: list[int | None],
        batch: int,
        views: int = 1,
    ) -> None:
        self.model, self.spec, self.leaves, self.axes, self.batch = model, spec, leaves, axes, batch
        self.views = views  # augmentation multiplicity: the model runs on (B·K, ...)
        self.rng = _RngState(_cuda_devices(model, leaves))
        self.buffers = _Buffers(model)

    def restore(self) -> None:
        self.buffers.restore()
        self.rng.restore()

    def forward(self, j: int | None) -> Any:
        """Run the model from the saved state on a copy of the inputs, example ``j`` replaced."""
        return self._run(lambda x, ax: x.clone() if j is None or ax is None else _replace(x, ax, j))

    def forward_fresh(self) -> Any:
        """Run the model from the saved state with every example replaced by fresh values.

        What comes out the same does not depend on the data at all (the
        backward check leaves such batch-free values out, see
        :mod:`.backward_probe`).
        """
        return self._run(lambda x, ax: x.clone() if ax is None else _fresh(x))

    def _run(self, copy_of: Callable[[Tensor, int | None], Tensor]) -> Any:
        """The model from the saved state on ``copy_of(input, batch axis)`` of each input."""
        self.restore()
        copies: dict[int, Any] = {}  # by id, so aliased inputs stay aliased
        for x, ax in zip(self.leaves, self.axes, strict=True):
            if isinstance(x, Tensor) and id(x) not in copies:
                copies[id(x)] = copy_of(x, ax)
        leaves = [copies.get(id(x), x) if isinstance(x, Tensor) else x for x in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.call(args, kwargs)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model on these arguments, as the engine runs a training forward (its views)."""
        if self.views > 1:  # (clipping/views.py)
            args, kwargs = merge_views(args, kwargs, self.batch, self.views)
            return split_views(self.model(*args, **kwargs), self.batch, self.views)
        return self.model(*args, **kwargs)

    def run(self) -> None:
        reference = self.forward(None)
        after = self.buffers.values()
        for j in sorted({0, self.batch - 1}):
            out = self.forward(j)
            if not tree_unchanged(reference, out, j, self.batch):
                raise self.mixing_error(j)
            for name, a, b in zip(self.buffers.names, after, self.buffers.values(), strict=True):
                if not unchanged(a, b, None, self.batch):
                    raise ExampleMixingError(
                        f"Buffer `{name}` is updated from the batch during the forward: "
                        f"replacing example {j} of {self.batch} changed its value, and "
                        "state_dict() would release it without noise. Do not update buffers "
                        "from private data in training mode (or make the statistic a "
                        f"parameter trained with DP noise). {_FIX}"
                    )
        check_backward(self)  # after the forward probe: its errors name the module

    def mixing_error(self, j: int) -> ExampleMixingError:
        """Rerun the reference and example ``j`` with every module recorded; name the first mixer."""
        runs: list[list[_Event]] = []
        for jj in (None, j):
            rec = _Recorder(self.model)
            try:
                self.forward(jj)
            finally:
                rec.remove()
            runs.append(rec.events)
        path, how = _locate(runs[0], runs[1], j, self.batch)
        name = path or "<model>"
        kind = type(self.model.get_submodule(path)).__name__
        return ExampleMixingError(
            f"Module `{name}` ({kind}) mixes the examples of a batch: replacing example {j} "
            f"of {self.batch} {how}. DP-SGD's guarantee needs each example's gradient to "
            f"depend on that example alone. {_FIX}"
        )


# ------------------------------------------------------------------ inputs
def _suspended(clipper: GradClipper) -> bool:
    return bool(getattr(clipper, "is_suspended", getattr(clipper, "_suspended", False)))


def _leaf_signature(x: Any, batch_axis: int | None = None) -> Hashable:
    if isinstance(x, Tensor):
        shape = tuple(-1 if i == batch_axis else n for i, n in enumerate(x.shape))
        return (shape, x.dtype, x.device.type)
    if x is None or isinstance(x, (bool, str)):  # flags may change the code path
        return (type(x).__name__, x)
    return type(x).__name__  # numbers may be step counters: probing each would cost a lot


def _batch_size(leaves: list[Any], bd: int) -> int:
    """The batch size as the engine reads it: from the first tensor leaf."""
    for t in leaves:
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[bd] if t.dim() > bd and t.dim() >= 2 else t.shape[0])
    return 0


def _input_axis(x: Any, batch: int, bd: int) -> int | None:
    """The dimension along which an input leaf carries the batch, or ``None``."""
    if not isinstance(x, Tensor) or x.dtype == torch.bool or x.dim() == 0:
        return None
    ax = bd if x.dim() > bd and x.dim() >= 2 else 0
    if x.shape[ax] == batch:
        return ax
    return 0 if x.shape[0] == batch else None


def _replace(x: Tensor, ax: int, j: int) -> Tensor:
    """A copy of ``x`` with slice ``j`` along ``ax`` replaced (floats: large noise; ints: another row)."""
    y = x.clone()
    row = y.select(ax, j)
    if y.is_floating_point() or y.is_complex():
        row.copy_(_large_noise(x, row.shape, 7919 + j))  # our own stream, the same on reruns
        return y
    n = y.shape[ax]
    for k in [(j + d) % n for d in range(1, n)]:
        other = x.select(ax, k)
        if not torch.equal(other, row):
            row.copy_(other)
            break
    return y


def _large_noise(x: Tensor, shape: torch.Size, seed: int) -> Tensor:
    """Gaussian noise of ``shape``, ten times ``x``'s largest finite entry, in ``x``'s dtype."""
    finite = x[torch.isfinite(x)]
    scale = 10.0 * float(finite.abs().max()) + 1.0 if finite.numel() else 1.0
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    top = torch.finfo(x.dtype).max / 4
    return noise.clamp(-top, top).to(device=x.device, dtype=x.dtype)


def _fresh(x: Tensor) -> Tensor:
    """Values unrelated to ``x``'s, of its shape (floats: large noise; ints: uniform in its range)."""
    if x.is_floating_point() or x.is_complex():
        return _large_noise(x, x.shape, 15485863)
    gen = torch.Generator().manual_seed(15485863)  # our own stream, the same on reruns
    if x.dtype == torch.bool:
        return (torch.rand(x.shape, generator=gen) < 0.5).to(x.device)
    if not x.numel():
        return x.clone()
    lo, hi = int(x.min()), int(x.max())
    return torch.randint(lo, hi + 1, x.shape, generator=gen).to(device=x.device, dtype=x.dtype)


class _Recorder:
    """Forward hooks recording each module call's inputs and outputs, in execution order."""

    def __init__(self, model: nn.Module) -> None:
        self.events: list[_Event] = []
        self._stack: list[str] = []
        self._handles: list[Any] = []
        for path, m in model.named_modules():
            self._handles.append(m.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(self._post(path), with_kwargs=True, always_call=True)
            )

    def _pre(self, path: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, kwargs: Any) -> None:
            parent = self._stack[-1] if self._stack else None
            self.events.append(("in", path, parent, _clone((args, kwargs))))
            self._stack.append(path)

        return hook

    def _post(self, path: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self._stack:
                self._stack.pop()
            parent = self._stack[-1] if self._stack else None
            self.events.append(("out", path, parent, _clone(output)))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _clone(tree: Any) -> Any:
    """Copy the tensors (later in-place ops must not change what was recorded)."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, tree)


def _locate(ref: list[_Event], out: list[_Event], j: int, batch: int) -> tuple[str, str]:
    """The module path where the two runs first differ, and how (a phrase)."""
    for e0, e1 in zip(ref, out, strict=False):
        # The code running when this event fired: the module itself once its
        # children were all clean ("out"), its caller before it starts ("in").
        running = e0[1] if e0[0] == "out" else (e0[2] or "")
        if e0[:3] != e1[:3]:
            return running, (
                "changed which modules it calls (Python control flow on a batch "
                "statistic, e.g. `if x.mean() > 0`)"
            )
        if not tree_unchanged(e0[3], e1[3], j, batch):
            if e0[0] == "out":
                return running, "changed this module's outputs for other examples"
            return running, (
                f"changed, for other examples, the inputs it passes to `{e0[1] or '<model>'}`"
            )
    if len(ref) != len(out):
        e = (ref if len(ref) > len(out) else out)[min(len(ref), len(out))]
        return (e[1] if e[0] == "out" else (e[2] or "")), "changed which modules it calls"
    return "", "changed the model's outputs for other examples"


# ---------------------------------------------------------------- RNG, buffers
def _cuda_devices(model: nn.Module, leaves: list[Any]) -> list[int]:
    tensors = [*model.parameters(), *model.buffers(), *(x for x in leaves if isinstance(x, Tensor))]
    devs = {t.device.index for t in tensors if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devs.add(torch.cuda.current_device())
    return sorted(d for d in devs if d is not None)


class _RngState:
    """The global RNG states a forward may draw from, saved once and restored on demand."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]
        self.python = random.getstate()
        np = sys.modules.get("numpy")
        self.numpy = (np, np.random.get_state()) if np is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda:
            torch.cuda.set_rng_state(s, d)
        random.setstate(self.python)
        if self.numpy is not None:
            np, state = self.numpy
            np.random.set_state(state)


class _Buffers:
    """Every buffer's and parameter's object and a copy of its value, put back after each run.

    Parameters are state too: a forward that writes into one (a data-dependent
    initialisation, an embedding's ``max_norm`` renormalisation of a frozen
    table) releases data outside the noised gradient exactly like a buffer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self._entries: list[tuple[dict[str, Any], str, Tensor, Tensor]] = []
        for mpath, m in model.named_modules():
            for table in (m._buffers, m._parameters):
                for local, buf in table.items():
                    if buf is not None:
                        self.names.append(f"{mpath}.{local}" if mpath else local)
                        self._entries.append((table, local, buf, buf.detach().clone()))

    def values(self) -> list[Tensor | None]:
        """Copies of the current values (``None`` where one was deleted)."""
        out: list[Tensor | None] = []
        for table, local, _, _ in self._entries:
            cur = table.get(local)
            out.append(None if cur is None else cur.detach().clone())
        return out

    def restore(self) -> None:
        with torch.no_grad():
            for table, local, buf, saved in self._entries:
                table[local] = buf  # a forward may have rebound the name
                buf.copy_(saved)
