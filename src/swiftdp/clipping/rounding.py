"""The rounding model of the clipping engine, the precision it computes in, and its norm kernels.

Rounding cannot make an example look small: every per-example norm the
engine clips with is an *upper bound* on the norm of what it adds for the
example (see :mod:`swiftdp.clipping.contributions`). This module holds the
pieces those bounds are made of:

* the rounding model: ``u`` (:func:`unit_roundoff`), ``γ_n = n u / (1 - n u)``
  (:func:`gamma`), the compute dtype (:func:`compute_dtype`), TF32 / bf16
  matmul inputs (:func:`matmul_input_roundoff`), the relative error of one
  term of a dot product (:func:`term_error`) and of one term of a clipped sum
  (:func:`weighted_sum_error`);
* float64 sums of squares of per-example rows, formed block by block so
  that no float64 copy of a large tensor is ever materialised
  (:func:`sq_norms_f64`, :func:`norms_f64`);
* the ghost-norm bound ``‖g_iᵀ a_i‖² <= ⟨a aᵀ, g gᵀ⟩ + err``
  (:func:`ghost_sq_bound`);
* mixed precision: the engine's own arithmetic runs with ``torch.autocast``
  off (:func:`engine_precision`), so a backward called inside an autocast
  region cannot turn its float32 Gram matrices and clipped sums into bf16
  ones behind the rounding model; a forward the engine recomputes in the
  backward runs under the autocast of the original forward
  (:class:`AutocastState`), so it computes what that forward computed.

Rounding model: in a batched sum over examples each example's terms are
rounded at most ``T + B + 1`` times (``γ_n`` per term, ``u`` the unit
roundoff of the compute dtype, at least float32; TF32 matmuls count as
``u = 2⁻¹¹`` on their inputs). This is exact for any summation order when
an example has one term per output entry (instantiated gradients, ``T = 1``,
embeddings after merging repeated rows).

References:
    Higham. Accuracy and stability of numerical algorithms, 2nd ed., 2002
    (§3.1, 3.5: ``γ_n`` and inner products).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

F64 = torch.float64
U64 = 2.0**-53

# A sum of squares never holds a float64 copy of a large gradient: above _WHOLE
# elements it converts blocks of _CHUNK elements (1 MiB of float64, cache-sized,
# and small enough that the allocator reuses them without growing the heap: 4-16 MiB
# blocks were measured to leave ~40 MB of resident memory behind). _WHOLE was 2**20
# (8 MiB of float64 in one call): inside a step that fresh block cost 2-3.5 ms for
# ViT-tiny's 64 x 16,384 gradients against 0.46 ms alone, and blocks from 2**17 on
# took the whole step 164 -> 155 and 198 -> 171 ms (ViT, 1 thread), 164 -> 159 ms
# (2 threads), 173 -> 169 ms (transformer), 331 -> 325 ms (ResNet-18), interleaved.
_WHOLE = 1 << 17
_CHUNK = 1 << 17
# Dtypes whose promotion with float32 is float32 (no promote_types call needed).
_TO_F32 = frozenset({torch.float32, torch.float16, torch.bfloat16})


# --------------------------------------------------------------------- rounding
@functools.cache
def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a floating dtype (``2⁻²⁴`` for float32, ``2⁻⁸`` for bfloat16)."""
    return float(torch.finfo(dtype).eps) / 2.0


def gamma(n: int, u: float) -> float:
    """``γ_n = n u / (1 - n u)``, the relative error of ``n`` roundings (inf when ``n u >= 1``)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype norms and clipped sums are computed in: the inputs' promotion, at least float32."""
    dt = torch.float32
    for t in tensors:
        d = t.dtype
        if d is not dt and not (dt is torch.float32 and d in _TO_F32):
            dt = torch.promote_types(dt, d)
    return dt


@functools.cache
def max_finite(dtype: torch.dtype) -> float:
    """The largest finite value of ``dtype``."""
    return float(torch.finfo(dtype).max)


def matmul_input_roundoff(dtype: torch.dtype, device: torch.device, *, conv: bool = False) -> float:
    """Relative rounding of a float32 matmul's (or convolution's) inputs under TF32 / bf16 modes.

    Args:
        dtype: the matmul's dtype (only float32 has reduced-precision modes).
        device: where it runs.
        conv: a cuDNN convolution (``torch.backends.cudnn.allow_tf32``, on by default).

    Returns:
        0 for exact inputs, ``2⁻¹¹`` for TF32, ``2⁻⁸`` for bf16 (``"medium"`` precision).
    """
    if dtype != torch.float32:
        return 0.0
    prec = torch.get_float32_matmul_precision()
    u = 0.0 if prec == "highest" else 2.0**-11 if prec == "high" else 2.0**-8
    if device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
        if tf32:
            u = max(u, 2.0**-11)
    return u


def term_error(n: int, dtype: torch.dtype, device: torch.device, *, conv: bool = False) -> float:
    """Relative error bound of each term of an ``n``-term dot product computed in ``dtype``."""
    ui = matmul_input_roundoff(dtype, device, conv=conv)
    return (1.0 + ui) ** 2 * (1.0 + gamma(n, unit_roundoff(dtype))) - 1.0


def weighted_sum_error(
    terms: int, batch: int, dtype: torch.dtype, device: torch.device, *, conv: bool = False
) -> float:
    """Relative rounding ``θ`` of one term ``w_i x_{i,t}`` of a clipped sum over the batch.

    The weight is cast to ``dtype`` and multiplied in (two roundings), then the
    term is accumulated (``terms + batch + 1`` roundings, see the module notes).
    Memoised on its arguments and on the matmul precision settings it reads.
    """
    if dtype == torch.float32:
        prec = torch.get_float32_matmul_precision()
        tf32 = device.type == "cuda" and bool(
            torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32)
    else:
        prec, tf32 = "", False
    return _weighted_sum_error(terms, batch, dtype, device.type, conv, prec, tf32)


@functools.lru_cache(maxsize=4096)
def _weighted_sum_error(terms: int, batch: int, dtype: torch.dtype, device_type: str, conv: bool,
                        prec: str, tf32: bool) -> float:
    del prec, tf32  # part of the key only: term_error reads them again
    u = unit_roundoff(dtype)
    te = term_error(terms + batch + 1, dtype, torch.device(device_type), conv=conv)
    return (1.0 + u) ** 2 * (1.0 + te) - 1.0


# ------------------------------------------------------------ mixed precision
_P = ParamSpec("_P")
_R = TypeVar("_R")
_AUTOCAST_DEVICES: tuple[str, ...] = tuple(torch._C._autocast_supported_devices())


def _any_autocast() -> bool:
    return bool(torch._C._is_any_autocast_enabled())


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Turn ``torch.autocast`` off on every device type where it is on (a no-op elsewhere)."""
    if not _any_autocast():
        yield
        return
    with contextlib.ExitStack() as stack:
        for d in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(d):
                stack.enter_context(torch.autocast(d, enabled=False))
        yield


def engine_precision(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` (engine arithmetic in the backward pass) with ``torch.autocast`` off.

    Norms, clip factors and clipped sums are computed in :func:`compute_dtype`
    (at least float32) and their rounding bounds assume it; under autocast a
    float32 ``bmm`` or ``@`` would silently run in bf16/fp16.
    """
    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not _any_autocast():
            return fn(*args, **kwargs)
        with autocast_off():
            return fn(*args, **kwargs)

    return run


@dataclass(frozen=True)
class AutocastState:
    """The ``torch.autocast`` settings in force at one moment (of a forward pass).

    Attributes:
        enabled: ``(device type, dtype)`` of every device type autocast was on for.
        cache: whether autocast's weight-cast cache was enabled.
    """

    enabled: tuple[tuple[str, torch.dtype], ...] = ()
    cache: bool = True

    @classmethod
    def now(cls) -> AutocastState:
        """The settings in force now (call it during the forward to be replayed)."""
        if not _any_autocast():
            return cls()
        return cls(tuple((d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
                         if torch.is_autocast_enabled(d)), torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run a recomputation of that forward under its settings (autocast off elsewhere)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast_off())
            for d, dtype in self.enabled:
                stack.enter_context(torch.autocast(d, dtype=dtype, cache_enabled=self.cache))
            yield


# ------------------------------------------------------------ sums of squares
def sq_norms_f64(rows: Tensor) -> tuple[Tensor, int]:
    """Per-row sums of squares of ``(B, n)`` rows, accumulated in float64, and their roundings.

    Up to ``2¹⁷`` elements, one ``vector_norm`` call. Above, the float64
    conversion runs block by block (``2¹⁷`` elements at a time): a whole row
    block at once when a row fits, so each row is reduced exactly as by one
    call; a long row is cut into column chunks whose float64 results are
    added up (the extra roundings are counted). Never holds a float64 copy of
    a large input.

    Returns:
        ``(sq, k)``: float64 ``(B,)`` with ``sq`` within a relative ``γ_k``
        (``u = 2⁻⁵³``) of the exact ``Σ_j x_j²``; ``k = n + 2`` unless a row
        was cut in ``m > 1`` chunks (``n + 2 + m``).
    """
    B, n = rows.shape
    if rows.dtype == F64 or B * n <= _WHOLE:
        return torch.linalg.vector_norm(rows, dim=1, dtype=F64).square(), n + 2
    cb = min(n, _CHUNK)
    rb = max(1, _CHUNK // cb)
    parts = []
    for i in range(0, B, rb):
        block = rows[i:i + rb]
        acc: Tensor | None = None
        for j in range(0, n, cb):
            s = torch.linalg.vector_norm(block[:, j:j + cb], dim=1, dtype=F64).square_()
            acc = s if acc is None else acc.add_(s)
        assert acc is not None
        parts.append(acc)
    chunks = -(-n // cb)
    sq = parts[0] if len(parts) == 1 else torch.cat(parts)
    return sq, (n + 2 if chunks == 1 else n + 2 + chunks)


def norms_f64(rows: Tensor) -> tuple[Tensor, int]:
    """Per-row Euclidean norms of ``(B, n)`` rows in float64, and the roundings of their squares.

    Returns:
        ``(norm, k)`` with ``norm²`` within a relative ``γ_k`` (``u = 2⁻⁵³``)
        of ``Σ_j x_j²``: ``k = n + 2`` for one ``vector_norm`` call, more
        when :func:`sq_norms_f64` had to work block by block (one more
        rounding for the square root).
    """
    B, n = rows.shape
    if rows.dtype == F64 or B * n <= _WHOLE:
        return torch.linalg.vector_norm(rows, dim=1, dtype=F64), n + 2
    sq, k = sq_norms_f64(rows)
    return sq.sqrt_(), k + 2


# ------------------------------------------------------------------ ghost norm
def ghost_sq_bound(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Upper bounds on ``‖g_iᵀ a_i‖²_F`` without forming ``g_iᵀ a_i``, and the masses ``N_i``.

    With ``A = a aᵀ`` and ``Γ = g gᵀ`` (``T × T`` per example) formed in the
    compute dtype, each entry is off by at most ``θ_d ‖a_t‖‖a_s‖`` (``θ_p``
    for ``Γ``), so ``|⟨A, Γ⟩ − ⟨Â, Γ̂⟩| ≤ θ_d nₐᵀ|Γ̂|nₐ + θ_p n_gᵀ|Â|n_g + θ_d θ_p N²``
    with ``nₐ = (‖a_t‖)_t`` read off ``diag Â``; the sum ``Σ_s Â_ts Γ̂_ts`` of
    each row adds ``γ_T Σ|Â Γ̂| ≤ γ_T (1+θ_d) nₐᵀ|Γ̂|nₐ``, the rows are summed in
    float64. For honest inputs the bound adds about ``(θ_d + γ_T)(1 + T/√p)``
    to the relative error of ``‖G_i‖²`` (≈ 1e-4 in float32 at ``d = p = 256``,
    ``T = 128``); for a crafted cancelling input it keeps the norm honest
    (about ``√θ_d · N_i`` instead of zero).

    The quadratic forms are batched matrix-vector products (no ``T × T``
    temporary beyond ``Â`` and ``Γ̂``), their inputs' TF32 rounding counted.

    Args:
        a: activations ``(B, T, d)``.
        g: output gradients ``(B, T, p)``.

    Returns:
        ``(sq, mass)`` in float64, shape ``(B,)``: ``sq >= ‖g_iᵀ a_i‖²`` and
        ``mass = Σ_t ‖a_t‖‖g_t‖ >= ‖g_iᵀ a_i‖`` (upper bounds); non-finite
        where the example's inputs are (or its Gram matrices overflow; for
        ``T = 1``, where ``‖a_i‖²`` does).
    """
    B, T, d = a.shape
    p = g.shape[2]
    if B == 0:
        z = a.new_zeros(0, dtype=F64)
        return z, z
    dt = compute_dtype(a, g)
    if T == 1:
        na, ka = norms_f64(a.reshape(B, d))
        ng, kg = norms_f64(g.reshape(B, p))
        mass = torch.mul(na, ng).mul_(1.0 + gamma(ka + kg, U64))
        # As for T > 1, where the Gram matrix overflows: an activation whose norm
        # squared is beyond the compute dtype is dropped. The clipped sum scales g
        # by the weight, and a subnormal product is off by 2⁻¹⁵⁰ absolutely, which
        # only an activation this large would magnify to something measurable.
        mass = mass.masked_fill_(na > math.sqrt(max_finite(dt)), math.inf)
        return mass.square(), mass
    a_, g_ = a.to(dt), g.to(dt)
    aa = torch.bmm(a_, a_.transpose(1, 2))
    gg = torch.bmm(g_, g_.transpose(1, 2))
    # Σ_s Â_ts Γ̂_ts in dt (T terms), then over t in float64
    sq = torch.linalg.vecdot(aa, gg).to(F64).sum(1)
    th_a, th_g = term_error(d, dt, a.device), term_error(p, dt, a.device)
    na = (aa.diagonal(dim1=1, dim2=2).to(F64) / (1.0 - th_a)).sqrt()  # >= ‖a_t‖
    ng = (gg.diagonal(dim1=1, dim2=2).to(F64) / (1.0 - th_g)).sqrt()
    # quadratic forms nₐᵀ|Γ̂|nₐ and n_gᵀ|Â|n_g: non-negative terms, so a T-term
    # matrix-vector product (inputs rounded to TF32 where enabled) is within
    # `grow` of the exact value
    u = unit_roundoff(dt)
    ui = matmul_input_roundoff(dt, a.device)
    grow = (1.0 + ui) ** 2 * (1.0 + u) ** 2 * (1.0 + gamma(T + 4, u))
    qa = (torch.bmm(gg.abs_(), na.to(dt).unsqueeze(2)).squeeze(2).to(F64) * na).sum(1) * grow
    qg = (torch.bmm(aa.abs_(), ng.to(dt).unsqueeze(2)).squeeze(2).to(F64) * ng).sum(1) * grow
    mass = (na * ng).sum(1) * (1.0 + gamma(T + 2, U64))
    # the products and their row sums rounded in dt (Σ|ÂΓ̂| <= (1+θ_a) qa)
    prod_err = (gamma(T + 2, u) + gamma(T + 2, U64)) * (1.0 + th_a) * qa
    err = th_a * qa + th_g * qg + th_a * th_g * mass * mass + prod_err
    return (sq + err).clamp(min=0), mass


__all__ = [
    "F64", "U64", "AutocastState", "autocast_off", "compute_dtype", "device_constant",
    "engine_precision", "gamma",
    "ghost_sq_bound", "matmul_input_roundoff", "max_finite", "norms_f64", "sq_norms_f64",
    "term_error", "unit_roundoff", "weighted_sum_error",
]


def device_constant(values: tuple[float, ...], device: torch.device,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """A 1-D tensor of ``values`` on ``device``, built once and reused.

    ``torch.tensor(list, device=cuda)`` copies from pageable host memory and
    synchronises the stream: a step must not do it every time for numbers
    that repeat (thresholds, rounding constants). Do not write into the result.
    """
    return _constant(tuple(float(v) for v in values), str(device), dtype)


@functools.lru_cache(maxsize=512)
def _constant(values: tuple[float, ...], device: str, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
