"""Gaussian noise for DP-SGD from the library's own generator.

The noise generator is separate from torch's global one, so user code that
reseeds torch cannot make the noise predictable.

Seeded mode (``secure=False``): the generator's state is saved in
checkpoints so that a resumed run continues the same noise stream bit for
bit. Whoever holds such a checkpoint (or the seed) can regenerate the noise
of every later step and subtract it from the released model, so the
checkpoint is as secret as the training data.

``secure=True`` returns a :class:`SecureGenerator`: the noise is then drawn
from the operating system's cryptographically secure generator
(``os.urandom``, the kernel's ChaCha20 CSPRNG), never from torch's Mersenne
Twister, and nothing of it is ever recorded; checkpoints never contain a
state, and a resumed run simply keeps drawing fresh OS entropy, so no noise
is ever replayed. Each coordinate's noise is the sum of
:data:`SECURE_SUMMANDS` independent Box–Muller Gaussians in float64 (53-bit
uniforms, never 0), scaled by ``1/√k``: exactly ``N(0, std²)`` in
distribution (52-bit uniforms, odd multiples of 2⁻⁵³), and the standard mitigation of the floating-point attacks on
a single floating-point Gaussian sample (Mironov 2012; Jin et al. 2022),
whose output's low-order bits can reveal the value it was added to — a sum
of several samples fills them. It is a mitigation, not the discrete
Gaussian's exact guarantee. Cost: measured in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

SECURE_SUMMANDS = 4
"""Gaussians summed for each coordinate of secure noise."""


class SecureGenerator(torch.Generator):
    """The mark of secure noise: :func:`add_gaussian_noise` draws it from ``os.urandom``.

    A ``torch.Generator`` by type (what the optimizer holds), reseeded from OS
    entropy, whose own stream is never used for the noise; checkpoints leave
    its state out (:mod:`swiftdp.api.checkpoint`). Build it with
    :func:`make_noise_generator` (``secure=True``).
    """


def secure_standard_normal(n: int, summands: int = SECURE_SUMMANDS) -> torch.Tensor:
    """``n`` standard normal float64 samples from the OS CSPRNG, each a sum of ``summands``.

    Box–Muller on 53-bit uniforms in ``(0, 1)`` from ``os.urandom``; the
    ``summands`` samples of each coordinate are summed and scaled by
    ``1/√summands``.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    pairs = (n * summands + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64)
    # odd multiples of 2^-53: exactly representable, strictly inside (0, 1)
    u = ((raw >> np.uint64(12)) * np.uint64(2) + np.uint64(1)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = 2.0 * np.pi * u[pairs:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: n * summands]
    out = z.reshape(n, summands).sum(1) / math.sqrt(summands)
    return torch.from_numpy(out)


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

    A parameter without ``.grad`` gets one (the noise alone). On the CPU the
    noise is drawn from ``generator`` itself. On another device it is drawn
    there, by that device's generator seeded for this call from ``generator``
    (one 62-bit draw on the CPU, :func:`device_generator`): no host-side
    Gaussians, no copy to the device and no synchronisation, and the stream
    is still fixed by ``generator``'s state (a resumed run continues it; the
    device's own algorithm — Philox on CUDA — makes it differ from the CPU
    stream). Secure noise is always drawn on the host (``os.urandom``).

    Args:
        params: the trainable parameters (or anything with ``grad``, ``shape``
            and ``dtype``: the optimizer passes float32 accumulators).
        std: the noise standard deviation (σ · sensitivity).
        generator: the library's noise generator.
    """
    secure = isinstance(generator, SecureGenerator)
    on_device: dict[torch.device, torch.Generator] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if std == 0:
            continue
        g = p.grad
        if secure:  # OS CSPRNG, float64 sum of Gaussians (module docstring)
            noise = secure_standard_normal(p.shape.numel()).reshape(p.shape)
        elif g.device.type == "cpu":
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        else:
            if g.device not in on_device:
                on_device[g.device] = device_generator(generator, g.device)
            noise = torch.randn(p.shape, generator=on_device[g.device], dtype=g.dtype,
                                device=g.device)
        g.add_(noise.to(device=g.device, dtype=g.dtype), alpha=std)


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from the next 62 bits of ``generator``.

    Each call advances ``generator`` (a CPU generator, the one checkpoints
    save) by one draw and returns a fresh generator for ``device`` seeded
    with it, so the noise drawn from it is fixed by ``generator``'s state and
    differs at every call.

    Args:
        generator: the library's CPU noise generator.
        device: where the noise is drawn.

    Returns:
        A ``torch.Generator`` on ``device``.
    """
    seed = int(torch.randint(0, 1 << 62, (), generator=generator))
    out = torch.Generator(device=device)
    out.manual_seed(seed)
    return out
