"""FlashOptim numerics on plain tensors: the specification every kernel is tested against.

Everything here is pure PyTorch and runs on any device. Each function uses only IEEE
round-to-nearest operations (``+ - * /`` and ``sqrt`` on fp32) in a fixed order, so the fused
Triton kernel (which does the same operations with FMA contraction disabled, ``div_rn`` and
``sqrt_rn``) reproduces these results bit for bit.

**Split master weights** (paper §3.1). A fp32 master θ is stored as the narrow parameter
θ' = RNE(θ) (bf16 or fp16) plus a signed integer ρ:

    ρ = round(clamp((θ − θ') / (u/2), −1, 1) · N)        u = ULP(θ'), N = 127 (int8) | 32767 (int16)
    θ̂ = θ' + (ρ / N) · (u/2)

|θ − θ'| ≤ u/2 under round-to-nearest, so the correction needs no exponent; the worst-case
reconstruction error is u/(4N) (≈ 2^-16 relative for int8, fp32's own half-ULP for int16),
plus one fp32 rounding of the final sum. The exponent of u is clamped below at ``_RHO_EMIN``:
fp16's smallest normal exponent (−14, so zero and subnormal θ' use the subnormal spacing), and
−100 for bf16 — there the bf16 minimum (−126) would make N·2^(8−e) overflow fp32, and the
kernel multiplies by that constant (one multiply instead of three); below |θ'| = 2^-100 the
correction resolves 2^-108/N absolute instead of u/(2N).
Non-finite θ' (±inf, NaN) stores ρ = 0 and reconstructs to θ' itself.
Memory: 1 byte (int8, "24-bit master") or 2 bytes (int16, "32-bit master") per element.

**Companded 8-bit states** (paper §3.2). States are cut into canonical groups of G elements
(see :mod:`flashoptim_dist.layout`); each group stores one scale.

* signed (first moment, momentum): s = group absmax, x = m·(1/s) ∈ [−1, 1],
  q = round(254x/(1+|x|)) as int8; inverse x = y/(2−|y|), y = q/127.
* unsigned square-root (Adam second moment): s = group max of √v,
  q = round(√v · (255/s)) as uint8; inverse v = ((q/255) · s)².

(The fp32 operation order of the encoders, one rounding per operation: ``fl(m·fl(1/s))``,
``fl(fl(254x)/fl(1+|x|))``, ``fl(√v·fl(255/s))``; the constants sit where the kernel spends
the fewest instructions on them. Decoding does not depend on it.)

Memory: 1 byte per element plus 2 bytes per group (0.0625 B/element at G = 32).

**Scale format.** Scales are stored as bf16 *rounded up* (towards +inf) from the fp32 absmax.
bf16 has fp32's 8-bit exponent, so the scale keeps the same relative precision (2^-8) from
1e-38 to 3e38 — fp16 scales go subnormal below 6.1e-5 and lose all precision near 6e-8, which
is where LLM second moments live. Rounding *up* keeps every |x| = |m|/s ≤ 1, so nothing clips;
the price is at most 2^-8 of the code range.

**Rounding** of codes and ρ is round-half-to-even (``torch.round``). The kernel gets it from
the fp32 adder, ``(z + 1.5·2^23)`` leaves round(z) in the low mantissa bits for |z| < 2^22,
which costs one add and one integer subtract instead of a floor and a float→int conversion
(the conversion unit is a quarter-rate pipe on Hopper and was one of the kernel's bottlenecks).

**Non-finite state values** (a NaN or inf gradient) are stored as code 0 and do not enter the
group's scale, so they cannot corrupt the other elements of their group, let alone other groups.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "GROUP_SIZE",
    "true_div",
    "sqrt_rn",
    "SIGNED_LEVELS",
    "UNSIGNED_LEVELS",
    "rho_levels",
    "ceil_to_bf16",
    "half_ulp_exponent",
    "split_master",
    "merge_master",
    "quantize_signed",
    "dequantize_signed",
    "quantize_sqrt",
    "dequantize_sqrt",
    "quantize_linear_signed",
    "dequantize_linear_signed",
]

#: Default canonical group size (elements per scale).
GROUP_SIZE = 32
#: Code range of the signed compander: q ∈ [−127, 127].
SIGNED_LEVELS = 127
#: Code range of the square-root compander: q ∈ [0, 255].
UNSIGNED_LEVELS = 255

# Reciprocals of the code ranges, rounded to fp32 once: decoding multiplies by them (cheaper
# than dividing on the GPU; the kernel uses the same fp32 constants, so results stay identical).
INV_SIGNED = float(torch.tensor(1.0 / SIGNED_LEVELS, dtype=torch.float32))
INV_UNSIGNED = float(torch.tensor(1.0 / UNSIGNED_LEVELS, dtype=torch.float32))
INV_RHO = {127: float(torch.tensor(1.0 / 127, dtype=torch.float32)), 32767: float(torch.tensor(1.0 / 32767, dtype=torch.float32))}

# (smallest normal exponent, explicit mantissa bits) of each narrow parameter format.
_NARROW_FORMATS = {torch.bfloat16: (-126, 7), torch.float16: (-14, 10)}
_BF16_MAX_BITS = 0x7F7F0000  # largest finite bf16, as fp32 bits
#: Smallest exponent of ρ's spacing u/2 (see the module doc): ρ·N·2^(mant+1−e) must stay finite.
_RHO_EMIN = {torch.bfloat16: -100, torch.float16: -14}


def rho_levels(rho_dtype: torch.dtype) -> int:
    """N of the ρ encoding: 127 for int8 (24-bit masters), 32767 for int16 (32-bit masters)."""
    if rho_dtype == torch.int8:
        return 127
    if rho_dtype == torch.int16:
        return 32767
    raise TypeError(f"ρ must be int8 or int16, got {rho_dtype}")


def true_div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c as an IEEE-rounded division per element.

    PyTorch's CPU kernels may turn division by a Python scalar into multiplication by its
    reciprocal, which differs in the last bit now and then; the Triton kernel divides
    (``div_rn``). Dividing by a full tensor keeps the two identical.
    """
    return x / torch.full_like(x, c)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root.

    ``torch.sqrt`` on CPU float32 is not always correctly rounded (seen: 717 of 4096 random
    values off by one ULP with torch 2.13); the root of the float64 value rounded to fp32 is
    (53 ≥ 2·24 + 2 bits, so the double rounding is harmless), and equals the kernel's sqrt_rn.
    """
    return torch.sqrt(x.double()).float()


def _reciprocal(scale: torch.Tensor, numerator: float = 1.0) -> torch.Tensor:
    """numerator/s per group (IEEE division, once per group), 0 for an all-zero group."""
    s = scale.float()
    return torch.where(s > 0, torch.full_like(s, numerator) / torch.where(s > 0, s, 1.0), 0.0)


def _round_code(z: torch.Tensor) -> torch.Tensor:
    """Nearest integer, ties to even (the kernel's fp32-adder rounding)."""
    return torch.round(z)


def ceil_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative finite fp32 values up to the next bf16 (saturating at bf16 max).

    Integer arithmetic on the bit pattern: exact, and identical in the Triton kernel.
    """
    bits = x.float().contiguous().view(torch.int32)
    up = torch.where((bits & 0xFFFF) != 0, bits + 0x10000, bits) & -65536
    up = torch.clamp(up, max=_BF16_MAX_BITS)
    return (up >> 16).to(torch.int16).view(torch.bfloat16)


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2**n as fp32 for integer n in [-149, 127], built from bits (subnormal below -126); exact."""
    normal = (n + 127) << 23
    sub = torch.bitwise_left_shift(torch.ones_like(n), torch.clamp(n + 149, 0, 22))
    return torch.where(n >= -126, normal, sub).to(torch.int32).view(torch.float32)


def _exponent(narrow_as_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unbiased exponent of each value, clamped below to ``_RHO_EMIN`` of the format."""
    e = ((narrow_as_fp32.contiguous().view(torch.int32) >> 23) & 0xFF) - 127
    return torch.clamp(e, min=_RHO_EMIN[dtype])


def half_ulp_exponent(narrow_as_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """k such that 2**k is the spacing ρ counts in: half the ULP of each value (given exactly in
    fp32) of format ``dtype``, with the exponent clamped below at ``_RHO_EMIN`` (fp16: zero and
    subnormal values use the subnormal spacing; bf16: values below 2^-100 use 2^-108).
    """
    return _exponent(narrow_as_fp32, dtype) - _NARROW_FORMATS[dtype][1] - 1


def split_master(master: torch.Tensor, dtype: torch.dtype, rho_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a fp32 master into (narrow param of ``dtype``, ρ of ``rho_dtype``). See module doc."""
    if master.dtype != torch.float32:
        raise TypeError(f"split_master expects a float32 master, got {master.dtype}")
    if dtype not in _NARROW_FORMATS:
        raise TypeError(f"split_master narrows to bfloat16 or float16, got {dtype}")
    n_levels = rho_levels(rho_dtype)
    param = master.to(dtype)  # round to nearest even
    pf = param.float()
    finite = torch.isfinite(pf)
    diff = torch.where(finite, master - pf, 0.0)  # exact (Sterbenz): θ and θ' are within 2x
    # r = diff / (u/2) = (diff · 2^(mant+1)) · 2^-e: both products are exact (powers of two,
    # no overflow since |diff| ≤ u/2; a subnormal r is below 2^-126 and gives ρ = 0 anyway)
    mant = _NARROW_FORMATS[dtype][1]
    r = (diff * float(2 ** (mant + 1))) * _pow2(-_exponent(pf, dtype))
    r = torch.clamp(r, -1.0, 1.0)
    rho = torch.where(finite, _round_code(r * float(n_levels)), 0.0)
    return param, rho.to(rho_dtype)


def merge_master(param: torch.Tensor, rho: Optional[torch.Tensor]) -> torch.Tensor:
    """Reconstruct the fp32 master θ̂ = θ' + (ρ/N)·(u/2) from a narrow param and its ρ."""
    pf = param.float()
    if rho is None or param.dtype == torch.float32:
        return pf
    n_levels = rho_levels(rho.dtype)
    k = half_ulp_exponent(pf, param.dtype)
    delta = (rho.float() * INV_RHO[n_levels]) * _pow2(k)  # one rounding of the exact product
    return torch.where(torch.isfinite(pf), pf + delta, pf)


# ----------------------------------------------------------------------------------------------
# groups


def _grouped(x: torch.Tensor, phase: int, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """View a 1-D run as (n_groups, G) canonical groups: pad ``phase`` in front, fill the tail."""
    n = x.numel()
    if not 0 <= phase < group_size:
        raise ValueError(f"phase must be in [0, {group_size}), got {phase}")
    n_groups = (phase + n + group_size - 1) // group_size
    padded = x.new_full((n_groups * group_size,), fill)
    padded[phase : phase + n] = x.reshape(-1)
    return padded.view(n_groups, group_size)


def _ungroup(g: torch.Tensor, phase: int, n: int) -> torch.Tensor:
    return g.reshape(-1)[phase : phase + n]


def quantize_signed(
    x: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Companded int8 codes and bf16 scales of a signed 1-D fp32 run starting at ``phase``."""
    xf = x.float().reshape(-1)
    finite = torch.isfinite(xf)
    g = _grouped(torch.where(finite, xf, 0.0), phase, group_size)
    scale = ceil_to_bf16(g.abs().amax(dim=1))
    xn = g * _reciprocal(scale)[:, None]
    y = (xn * float(2 * SIGNED_LEVELS)) / (1.0 + xn.abs())
    q = torch.clamp(_round_code(y), -SIGNED_LEVELS, SIGNED_LEVELS)
    return _ungroup(q, phase, xf.numel()).to(torch.int8), scale


def dequantize_signed(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> torch.Tensor:
    """Inverse of :func:`quantize_signed`: fp32 values of int8 companded codes."""
    y = _grouped(codes.float(), phase, group_size) * INV_SIGNED
    x = y / (2.0 - y.abs())
    return _ungroup(x * scales.float()[:, None], phase, codes.numel())


def quantize_sqrt(
    v: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of √v and bf16 scales (group max of √v) for a non-negative 1-D run."""
    vf = v.float().reshape(-1)
    ok = torch.isfinite(vf) & (vf > 0)
    r = sqrt_rn(torch.where(ok, vf, 0.0))
    g = _grouped(r, phase, group_size)
    scale = ceil_to_bf16(g.amax(dim=1))
    q = torch.clamp(_round_code(g * _reciprocal(scale, float(UNSIGNED_LEVELS))[:, None]), 0, UNSIGNED_LEVELS)
    return _ungroup(q, phase, vf.numel()).to(torch.uint8), scale


def dequantize_sqrt(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> torch.Tensor:
    """Inverse of :func:`quantize_sqrt`: v = ((q/255)·s)²."""
    t = (_grouped(codes.float(), phase, group_size) * INV_UNSIGNED) * scales.float()[:, None]
    return _ungroup(t * t, phase, codes.numel())


def quantize_linear_signed(
    x: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain linear absmax int8 (no compander). Kept only as the baseline companding is measured against."""
    xf = x.float().reshape(-1)
    g = _grouped(xf, phase, group_size)
    scale = ceil_to_bf16(g.abs().amax(dim=1))
    s = scale.float()[:, None]
    q = _round_code(torch.where(s > 0, g / torch.where(s > 0, s, 1.0), 0.0) * float(SIGNED_LEVELS))
    return _ungroup(q, phase, xf.numel()).to(torch.int8), scale


def dequantize_linear_signed(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> torch.Tensor:
    y = true_div(_grouped(codes.float(), phase, group_size), float(SIGNED_LEVELS))
    return _ungroup(y * scales.float()[:, None], phase, codes.numel())
