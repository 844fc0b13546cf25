"""Count the host reads of tensor values in a block of code, on any device.

On an accelerator, a step must never wait for the device: reading a value
(``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``), an op whose output
size depends on the values (``nonzero``, a boolean mask index,
``masked_select``), a copy between host and device without ``non_blocking``,
or a tensor built from Python values on the device (``torch.tensor(list,
device=cuda)``: a copy from pageable memory) makes the host wait for the
kernels queued so far. :class:`HostReads` sees each of them as the
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


_INDEX = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
          _aten._index_put_impl_.default}


def _bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    """A boolean-mask index (read or write): a ``nonzero`` inside the op."""
    if func not in _INDEX or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _sized_by_values(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``repeat_interleave`` with a tensor of repeats and no ``output_size``."""
    if func is not _aten.repeat_interleave.Tensor and func is not _aten.repeat_interleave.self_Tensor:
        return False
    return kwargs.get("output_size") is None


def _blocking_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A copy between the host and a device that the host waits for."""
    if func is _aten._to_copy.default and args and isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        if dev is None or kwargs.get("non_blocking", False):
            return False
        return (args[0].device.type == "cpu") != (torch.device(dev).type == "cpu")
    if func is _aten.copy_.default and len(args) > 1:
        dst, src = args[0], args[1]
        nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and not nb
                and (src.device.type == "cpu") != (dst.device.type == "cpu"))
    return False


def _off_cpu(args: tuple[Any, ...]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu"
               for a in torch.utils._pytree.tree_leaves(args))


class HostReads(TorchDispatchMode):
    """A dispatch mode counting the ops that make the host wait for the device.

    Use it as a context manager around the code to check; :attr:`total` and
    :attr:`where` say how many and from which lines of swiftdp (or, failing
    that, of the caller).

    Args:
        cpu_too: count value reads (and tensors built from Python values) of
            CPU tensors too — the default, so that a CPU run stands in for a
            GPU one (on a GPU they would be device tensors); ``False`` on a
            GPU counts only what waits for the device (a read of a CPU
            generator's draw does not).

    Attributes:
        counts: ``(op name, where) -> count``.
    """

    def __init__(self, *, cpu_too: bool = True) -> None:
        super().__init__()
        self.cpu_too = cpu_too
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _READS or _bool_index(func, args) or _sized_by_values(func, args, kwargs):
            hit = self.cpu_too or _off_cpu(args)
        elif func is _aten.lift_fresh.default:  # torch.tensor(python values, device=...)
            hit = self.cpu_too or _off_cpu((out,))
        else:
            hit = _blocking_copy(func, args, kwargs)
        if hit:
            self.counts[(str(func), _site())] += 1
        return out

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
