"""Gaussian noise for DP-SGD from the library's own generator.

The noise generator is separate from torch's global one, so user code that
reseeds torch cannot make the noise predictable.

Seeded mode (``secure=False``): the generator's state is saved in
checkpoints so that a resumed run continues the same noise stream bit for
bit. Whoever holds such a checkpoint (or the seed) can regenerate the noise
of every later step and subtract it from the released model, so the
checkpoint is as secret as the training data.

``secure=True`` seeds a :class:`SecureGenerator` from the operating
system's entropy (``secrets``) and never records the seed; checkpoints never
contain its state, and a resumed run draws fresh OS entropy
(:func:`reseed_from_os_entropy`), so no noise is ever replayed. The samples
still come from torch's floating-point Gaussian sampler, which is known to
be attackable in principle (Mironov 2012); this is documented, not hidden.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import torch


class SecureGenerator(torch.Generator):
    """A CPU noise generator seeded from OS entropy whose state never leaves the process.

    It is an ordinary ``torch.Generator``; the type marks it so that
    checkpoints leave its state out (:mod:`swiftdp.api.checkpoint`). Build it
    with :func:`make_noise_generator` (``secure=True``).
    """


def make_noise_generator(seed: int | None, *, secure: bool = False) -> tuple[torch.Generator, int | None]:
    """A CPU generator for the noise.

    Args:
        seed: the seed (ignored when ``secure``); ``None`` draws one from the OS.
        secure: seed from OS entropy, do not keep the seed, and return a
            :class:`SecureGenerator` (whose state checkpoints never hold).

    Returns:
        ``(generator, seed_recorded)``; the seed is ``None`` when ``secure``
        or when ``seed`` is ``None``.
    """
    if secure:
        secure_generator = SecureGenerator(device="cpu")
        reseed_from_os_entropy(secure_generator)
        return secure_generator, None
    g = torch.Generator(device="cpu")
    if seed is None:
        reseed_from_os_entropy(g)
        return g, None
    g.manual_seed(int(seed))
    return g, int(seed)


def is_secure(generator: torch.Generator) -> bool:
    """Whether ``generator`` was built with ``secure=True`` (its state must not be saved).

    Args:
        generator: a noise generator.

    Returns:
        ``True`` for a :class:`SecureGenerator`.
    """
    return isinstance(generator, SecureGenerator)


def reseed_from_os_entropy(generator: torch.Generator) -> None:
    """Seed ``generator`` from the operating system's entropy; the seed is not kept.

    Used when a secure run resumes from a checkpoint: the noise after the
    resume is independent of everything stored anywhere.

    Args:
        generator: the generator to reseed (in place).
    """
    generator.manual_seed(secrets.randbits(63))


def add_gaussian_noise(params: Iterable[Any], std: float, generator: torch.Generator) -> None:
    """Add ``N(0, std²)`` to every coordinate of each parameter's ``.grad`` (in place).

    A parameter without ``.grad`` gets one (the noise alone). Noise is drawn on
    the CPU generator and moved to the parameter's device, so the stream is
    the same on every device.

    Args:
        params: the trainable parameters (or anything with ``grad``, ``shape``
            and ``dtype``: the optimizer passes float32 accumulators).
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
