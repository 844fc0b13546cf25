"""On CUDA: does a steady DP step of each suite model run without host synchronisation?

Runs each model's DP step (``make_private``, mode ``bk``, CE-mean loss) for a
few warm-up steps on the device, then one steady step under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the first op that
makes the host wait for the device; and the same step under
:class:`swiftdp.bench.syncs.HostReads`, which names every such op. Prints one
line per model and exits non-zero if any step synchronised. Part of
``benchmarks/gpu_session.sh``; on a CPU it runs the ``HostReads`` half only.

Usage::

    python3 benchmarks/gpu_sync_check.py [--models mlp,gpt] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

import swiftdp
from swiftdp.bench.models import SUITE, get_model
from swiftdp.bench.syncs import HostReads


def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def dp_step(name: str, device: torch.device, batch: int) -> tuple[Callable[[], None], Any]:
    """A DP step of suite model ``name`` on ``device``, drawing its batch from the DP loader."""
    spec = get_model(name, "small")
    torch.manual_seed(0)
    model = spec.build().to(device).train()
    x, y = (t.to(device) for t in spec.make_batch(batch, seed=1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(list(range(batch)), batch_size=batch, collate_fn=lambda _: (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = swiftdp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                  mode="bk", poisson_sampling=False, seed=0)
    dp.clipper.sync_free = True  # the default off the CPU; set so that a CPU run checks it too
    batches = _forever(dp.data_loader)

    def loss_of(out: Tensor, target: Tensor) -> Tensor:
        if spec.labels_are_inputs:
            out, target = out[:, :-1], target[:, 1:]
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    state: dict[str, Any] = {}

    def step() -> None:
        xb, yb = state.pop("next", None) or next(batches)
        dp.optimizer.zero_grad(set_to_none=True)
        loss_of(model(xb), yb).backward()
        dp.optimizer.step()

    def prefetch() -> None:  # the loader's own CPU seed read is not the step's
        state["next"] = next(batches)

    return step, prefetch


def main(argv: list[str] | None = None) -> int:
    """Check every model; print one line each; 1 if any step synchronised."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(SUITE))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    failed = 0
    for name in a.models.split(","):
        try:
            step, prefetch = dp_step(name, device, a.batch_size)
            for _ in range(a.warmup):
                step()
            prefetch()
            with HostReads(cpu_too=not cuda) as h:
                step()
            reads = h.total
            where = h.where()[:3]
            verdict = "not run (no CUDA)"
            if cuda:
                torch.cuda.synchronize()
                prefetch()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                    verdict = "no sync"
                except RuntimeError as exc:
                    verdict = f"SYNC: {str(exc).splitlines()[0][:200]}"
                    verdict += " at " + "".join(traceback.format_tb(exc.__traceback__)[-2:])[-400:]
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            bad = reads > 0 or verdict.startswith("SYNC")
            failed += bad
            print(f"{name}: HostReads {reads}{' ' + str(where) if reads else ''}; "
                  f"set_sync_debug_mode: {verdict}", flush=True)
        except Exception as exc:  # report and go on: one model's failure is a finding
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
