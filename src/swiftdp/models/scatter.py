"""A fixed (data-independent) scattering network: Morlet wavelets, modulus, low-pass.

The two-layer scattering transform of Mallat (2012), laid out as Kymatio's
``Scattering2D(J, L)``: every input channel gives 1 + J·L + L²·J(J-1)/2
channels (81 for J = 2, L = 8) at 1/2^J of the input resolution. Its filters
are computed from formulas, never from data, so using it costs no privacy
budget; they are frozen convolution kernels (buffers, no trainable
parameter), so the clipping engine never sees them. Tramèr and Boneh (2021)
show that DP-SGD on such features beats end-to-end DP-SGD on small budgets.

Filtering is by strided spatial convolution with Morlet kernels cropped to
±3 standard deviations of their envelope (zero padding), which is much
faster on a CPU than Kymatio's FFTs and close to them away from the border.
Each example is transformed on its own.

References:
    Mallat, "Group invariant scattering", CPAM 2012.
    Andreux et al., "Kymatio: scattering transforms in Python", JMLR 2020.
    Tramèr and Boneh, "Differentially private learning needs better
    features (or much more data)", ICLR 2021, https://arxiv.org/abs/2011.11660.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gabor(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A centred ``size x size`` Gabor filter (Kymatio's ``gabor_2d``, not periodised)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
    r = size // 2
    xx, yy = np.mgrid[-r: r + 1, -r: r + 1].astype(np.float64)
    arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
    arg = arg + 1j * xi * (xx * math.cos(theta) + yy * math.sin(theta))
    return np.exp(arg) / (2 * math.pi * sigma * sigma / slant)


def _support(sigma: float, slant: float) -> int:
    """Odd kernel size covering ±3 standard deviations of the widest envelope axis."""
    return 2 * math.ceil(3 * sigma / slant) + 1


def morlet_kernels(sigma: float, L: int) -> Tensor:
    """``L`` zero-mean Morlet wavelets at scale ``sigma``, as conv weights.

    Args:
        sigma: envelope width (0.8 · 2^j for scale j at full resolution).
        L: number of orientations.

    Returns:
        Real tensor ``(2L, 1, K, K)``: real and imaginary parts, interleaved.
    """
    slant = 4.0 / L
    size = _support(sigma, slant)
    xi = 3.0 / 4.0 * math.pi * 0.8 / sigma
    out = []
    for t in range(L):
        theta = (int(L - L / 2 - 1) - t) * math.pi / L
        wave = _gabor(size, sigma, theta, xi, slant)
        envelope = _gabor(size, sigma, theta, 0.0, slant)
        mor = wave - wave.sum() / envelope.sum() * envelope
        out += [mor.real, mor.imag]
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def gaussian_kernel(sigma: float) -> Tensor:
    """The low-pass φ: a normalised Gaussian, as a ``(1, 1, K, K)`` conv weight."""
    g = _gabor(_support(sigma, 1.0), sigma, 0.0, 0.0, 1.0).real
    return torch.tensor(g / g.sum(), dtype=torch.float32)[None, None]


def _conv(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """Convolve every channel of ``x`` (B, C, H, W) with every kernel: (B, C, K, H', W')."""
    b, c, h, w = x.shape
    out = F.conv2d(x.reshape(b * c, 1, h, w), weight, stride=stride, padding=weight.shape[-1] // 2)
    return out.reshape(b, c, weight.shape[0], *out.shape[-2:])


def _modulus(z: Tensor) -> Tensor:
    """``|re + i·im|`` of interleaved (re, im) channels on dim 2."""
    return z.unflatten(2, (-1, 2)).pow(2).sum(3).sqrt()


class ScatterNet(nn.Module):
    """Two-layer scattering transform with fixed Morlet filters (no trainable parameter).

    Input ``(B, C, H, W)``; output ``(B, C·K, ceil(H/2^J), ceil(W/2^J))`` with
    ``K = 1 + J·L + L²·J(J-1)/2``: order 0 ``x ⋆ φ_J``, order 1
    ``|x ⋆ ψ_{j,θ}| ⋆ φ_J`` and order 2 ``||x ⋆ ψ_{j1,θ1}| ⋆ ψ_{j2,θ2}| ⋆ φ_J``
    (j2 > j1). As in Kymatio, ``|x ⋆ ψ_j|`` is kept at resolution 2^j, and
    filters applied at resolution 2^r are the full-resolution ones shrunk by 2^r.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        J: number of scales (the output is subsampled by 2^J).
        L: number of orientations.

    Example:
        >>> ScatterNet((1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 81, 7, 7])
    """

    def __init__(self, input_shape: tuple[int, ...], J: int = 2, L: int = 8) -> None:
        super().__init__()
        c, h, w = input_shape
        self.J, self.L = J, L
        self.out_channels = c * (1 + J * L + L * L * J * (J - 1) // 2)
        self.out_hw = (math.ceil(h / 2**J), math.ceil(w / 2**J))
        # psi_{r}_{d}: the wavelet of scale r + d applied at resolution 2^r;
        # phi_{r}: the low-pass applied at resolution 2^r.
        for r in range(J):
            self.register_buffer(f"phi_{r}", gaussian_kernel(0.8 * 2 ** (J - 1 - r)),
                                 persistent=False)
            for d in range(J - r):
                self.register_buffer(f"psi_{r}_{d}", morlet_kernels(0.8 * 2**d, L),
                                     persistent=False)

    def output_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one output."""
        return self.out_channels, self.out_hw[0], self.out_hw[1]

    def _buf(self, name: str) -> Tensor:
        return self.get_buffer(name)

    def _lowpass(self, u: Tensor, r: int) -> Tensor:
        """``u ⋆ φ_J`` subsampled to resolution 2^J; ``u`` is (B, C, K, H_r, W_r)."""
        b, c, k = u.shape[:3]
        s = _conv(u.flatten(1, 2), self._buf(f"phi_{r}"), stride=2 ** (self.J - r))
        return s.reshape(b, c, k, *s.shape[-2:])

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Scattering coefficients of ``x``, shape ``(B, C·K, ceil(H/2^J), ceil(W/2^J))``."""
        J = self.J
        outs = [self._lowpass(x.unsqueeze(2), 0)]
        u1 = []
        for j1 in range(J):
            u = _modulus(_conv(x, self._buf(f"psi_0_{j1}"), stride=2**j1))  # (B, C, L, H, W)
            u1.append(u)
            outs.append(self._lowpass(u, j1))
        for j1 in range(J):
            for j2 in range(j1 + 1, J):
                b, c = x.shape[:2]
                z = _conv(u1[j1].flatten(1, 2), self._buf(f"psi_{j1}_{j2 - j1}"),
                          stride=2 ** (j2 - j1))
                u2 = _modulus(z.reshape(b, c, self.L, 2 * self.L, *z.shape[-2:]).flatten(2, 3))
                outs.append(self._lowpass(u2, j2))
        out = torch.cat(outs, dim=2)  # (B, C, K, h, w)
        return out.flatten(1, 2)
