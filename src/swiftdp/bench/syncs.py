"""Count the host reads of tensor values in a block of code, on any device.

On an accelerator, a step must never wait for the device: reading a value
(``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``), an op whose output
size depends on the values (``nonzero``, a boolean mask index,
``masked_select``) or a copy from the device to the host makes the host wait
for every kernel queued so far. :class:`HostReads` sees each of them as the
op reaches torch's dispatcher, on the CPU too, so a CPU test can prove a
step free of them before it ever runs on a GPU (``torch.cuda.set_sync_debug_mode``
is the CUDA-only equivalent). Reading host memory directly (``.tolist()``
of a CPU tensor, which the deferred warnings do) is not an op and is not counted.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_READS = {
    _aten._local_scalar_dense.default,  # .item(), float(), int(), bool() of one value
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_dim.default,
    _aten._unique2.default,
    _aten.unique_consecutive.default,
}


def _bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    if func is not _aten.index.Tensor or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func is _aten._to_copy.default and args and isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    if func is _aten.copy_.default and len(args) > 1:
        dst, src = args[0], args[1]
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu"
                and isinstance(dst, torch.Tensor) and dst.device.type == "cpu"
                and not kwargs.get("non_blocking", False))
    return False


class HostReads(TorchDispatchMode):
    """A dispatch mode counting the ops that make the host wait for the device.

    Use it as a context manager around the code to check; :attr:`total` and
    :attr:`where` say how many and from which lines of swiftdp (or, failing
    that, of the caller).

    Attributes:
        counts: ``(op name, where) -> count``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _READS or _bool_index(func, args) or _to_host(func, args, kwargs):
            self.counts[(str(func), _site())] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """How many host reads were seen."""
        return sum(self.counts.values())

    def where(self) -> list[str]:
        """One line per (op, site): ``count × op at site``, most frequent first."""
        return [f"{n} × {op} at {site}" for (op, site), n in self.counts.most_common()]


def _site() -> str:
    frames = traceback.extract_stack()[:-3]
    ours = [f for f in frames if "/swiftdp/" in f.filename and "/bench/syncs.py" not in f.filename]
    f = ours[-1] if ours else frames[-1]
    return f"{f.filename.rsplit('/swiftdp/', 1)[-1]}:{f.lineno}"
