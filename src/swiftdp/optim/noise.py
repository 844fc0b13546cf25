"""Gaussian noise for DP-SGD from the library's own generator.

The noise generator is separate from torch's global one, so user code that
reseeds torch cannot make the noise predictable, and its state is saved in
checkpoints so that a resumed run continues the same noise stream.

``secure=True`` seeds the generator from the operating system's entropy
(``secrets``) and never records the seed. The samples still come from
torch's floating-point Gaussian sampler, which is known to be attackable in
principle (Mironov 2012); this is documented, not hidden.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from torch import Tensor


def make_noise_generator(seed: int | None, *, secure: bool = False) -> tuple[torch.Generator, int | None]:
    """A CPU generator for the noise.

    Args:
        seed: the seed (ignored when ``secure``); ``None`` draws one from the OS.
        secure: seed from OS entropy and do not keep the seed.

    Returns:
        ``(generator, seed_recorded)``; the seed is ``None`` when ``secure``.
    """
    g = torch.Generator(device="cpu")
    if secure or seed is None:
        g.manual_seed(secrets.randbits(63))
        return g, None
    g.manual_seed(int(seed))
    return g, int(seed)


def add_gaussian_noise(params: Iterable[Tensor], std: float, generator: torch.Generator) -> None:
    """Add ``N(0, std²)`` to every coordinate of each parameter's ``.grad`` (in place).

    A parameter without ``.grad`` gets one (the noise alone). Noise is drawn on
    the CPU generator and moved to the parameter's device, so the stream is
    the same on every device.

    Args:
        params: the trainable parameters.
        std: the noise standard deviation (σ · sensitivity).
        generator: the library's noise generator.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if std == 0:
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.grad.add_(noise.to(device=p.grad.device, dtype=p.grad.dtype), alpha=std)
