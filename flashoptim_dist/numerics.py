"""FlashOptim numerics on plain tensors: the specification every kernel is tested against.

Everything here is pure PyTorch and runs on any device. Each function uses only IEEE
round-to-nearest operations (``+ - * /`` and ``sqrt`` on fp32) in a fixed order, so the fused
Triton kernel (which does the same operations with FMA contraction disabled, ``div_rn`` and
``sqrt_rn``) reproduces these results bit for bit.

**Split master weights** (paper §3.1). A fp32 master θ is stored as a narrow parameter θ'
(what the model computes with) plus a signed integer ρ that carries the bits θ' drops.

* bf16 parameters (the case that matters): bf16 is the top half of fp32, so the split is done on
  the bit pattern b of θ. With w = b + k + 0x8000 (32-bit unsigned):

      θ' = w >> 16 (bf16 bits)        ρ = ((w >> 8) & 0xFF) − 128   (int8, "24-bit master")
      θ' = w >> 16                    ρ = (w & 0xFFFF) − 0x8000     (int16, "32-bit master")
      θ̂ = bits (θ' << 16) + (ρ << 8)  (int8)       θ̂ = bits (θ' << 16) + ρ   (int16)

  The int16 pair holds θ exactly (k = 0). The int8 pair holds θ rounded to its top 24 bits (sign,
  exponent, 15 mantissa bits: a resolution of 2^-8 bf16 ULP, u/256, in every binade and in the
  subnormal range), and θ' is that 24-bit value rounded to the nearest bf16 (ties away from
  zero). k ∈ [0, 256) is the dither of stochastic rounding (unbiased: the 256 fp32 values that
  round to one 24-bit value lie in one binade, so rounding up with probability (b mod 256)/256
  is unbiased in value), or 128 for round-to-nearest (ties away from zero). Every NaN is
  first made the quiet NaN 0x7FC00000 (ρ = 0); ±inf give ρ = 0; a master above bf16's largest
  finite value gives θ' = ±inf, as round-to-nearest does.
  Cost in the kernel: a three-input integer add and byte permutes, where a float correction
  scaled by the ULP took ~20 instructions per element (docs/PERFORMANCE.md).
* fp16 parameters keep the paper's linear correction (their exponent is not fp32's):

      ρ = round(clamp((θ − θ') / (u/2), −1, 1) · N)        u = ULP(θ'), N = 127 (int8) | 32767 (int16)
      θ̂ = θ' + (ρ / N) · (u/2)

  θ' = RNE(θ), so |θ − θ'| ≤ u/2 and the correction needs no exponent; the reconstruction error
  is at most u/(4N) plus one fp32 rounding. The exponent of u is clamped below at fp16's
  smallest normal exponent (−14): zero and subnormal θ' use the subnormal spacing.
  Non-finite θ' (±inf, NaN) stores ρ = 0 and reconstructs to θ' itself.

(Checkpoints and state dicts written before the bit split — format versions ≤ 2 — hold the
linear ρ for bf16 too; :func:`rho_from_linear` converts them on load.)
Memory: 1 byte (int8, "24-bit master") or 2 bytes (int16, "32-bit master") per element.

**Companded 8-bit states** (paper §3.2). States are cut into canonical groups of G elements
(see :mod:`flashoptim_dist.layout`); each group stores one scale.

* signed (first moment, momentum): s = group absmax, x = m·(1/s) ∈ [−1, 1],
  q = round(254x/(1+|x|)) as int8; inverse x = y/(2−|y|) with y = q/127, computed as the one
  quotient q/(254−|q|) of two small integers, times s.
* unsigned square-root (Adam second moment): s = group max of √v,
  q = round(√v · (255/s)) as uint8, with 255/s rounded toward zero (so √v·(255/s) ≤ 255);
  inverse v = (q · (s/255))², s/255 as fl(s·fl(1/255)) once per group. Below v = 2^-101 the
  code is of v instead of √v (:data:`SQRT_V_MIN`).

(The fp32 operation order, one rounding per operation: encoders ``fl(m·fl(1/s))``,
``fl(fl(254x)/fl(1+|x|))``, ``fl(√v·rz(255/s))`` (rz: rounded toward zero); decoders
``fl(fl(q/(254−|q|))·s)`` and ``fl(t·t)``, t = ``fl(q·fl(s·fl(1/255)))``. The constants sit where
the kernel spends the fewest instructions on them. The decoders were ``fl(fl(y/(2−|y|))·s)``,
y = fl(q·fl(1/127)), and ``((q·fl(1/255))·s)²`` before 2026-12-04: the same companders, values
within a few fp32 ULPs, so stored codes keep their meaning and no format version changed.)

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

**Rounding modes.** Re-quantizing every step with round-to-nearest has fixed points: a second
moment decaying by 0.05% per step (β2 = 0.999) stays on its code, the momentum of an element
whose gradient stopped stays on its last code, and an update below ρ's resolution is dropped
every time. ``rounding="stochastic"`` (the default of every optimizer) rounds each code up or
down at random so that the *decoded value* is right in expectation:

* ρ of a bf16 parameter (int8): the 8-bit dither k of the bit split above — the low byte of
  θ's fp32 pattern is a fixed-point fraction of the 24-bit master's last bit, so adding k
  before truncating rounds up with probability exactly that fraction. An update of lr = 1e-7
  on weights near 1 (0.004 of a 24-bit step; it is a whole fp32 ULP) still moves the master
  at the right rate. int16 ρ is exact and draws nothing. fp16's linear ρ uses :func:`_sr_floor`
  with b = 15 (int8) or 7 (int16), as the moment codes do.
* the signed moment codes: ``q = ⌊z + k·2^-b⌋`` with a uniform b-bit integer k — unbiased in
  the code domain (on the 2^-b grid z is first rounded to); the compander's curvature between
  two adjacent codes leaves a bias below 2^-16 of the group scale per step. Computed in fixed
  point (:func:`_sr_floor`): adding a constant B puts z into a binade whose fp32 spacing is
  2^-b, so the bits of z + B are z in fixed point; add k and shift. The moment codes use b = 8
  (B = 49152), where the code's byte is a byte of z + B + k and costs the kernel nothing:
  moments change by far more than 2^-8 of a code per step.
* the √v codes: unbiased in **v**, not in √v. Rounding the code z = √v·255/s up with
  probability frac(z) would add Var(q)·(s/255)² to v at every step, and β2's EMA sums that bias
  over 1/(1−β2) steps (at β2 = 0.999 an element on code 10 ends with v 2.7× too large). Instead
  q = lo + 1 with probability (z² − lo²)/(2·lo + 1), lo = ⌊z⌋, so E[q²] = z²: the decoded v
  is exact in expectation. Written as lo² + u·(2lo + 1) < z², i.e. one fused multiply-add
  ``fma(lo, lo + 2u, u) < z²`` (z² exact) with u = k·2^-16.

The dither of an element is a pure function of (seed, parameter identity, step, canonical
global element index) — see :func:`dither_words` — so sharding, resharding and re-running draw
the same bits, and the Triton kernel draws them too (bit-identical to this module).
Group scales stay rounded *up* (no dither): a scale only has to bound the group, and with
unbiased codes the largest element's code moves below 255 while √v decays, so the scale follows
down one bf16 step at a time instead of pinning the group.

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
    "fma",
    "SIGNED_LEVELS",
    "UNSIGNED_LEVELS",
    "rho_levels",
    "ceil_to_bf16",
    "half_ulp_exponent",
    "split_master",
    "merge_master",
    "rho_from_linear",
    "quantize_signed",
    "dequantize_signed",
    "quantize_sqrt",
    "dequantize_sqrt",
    "SQRT_V_MIN",
    "sqrt_v",
    "quantize_linear_signed",
    "dequantize_linear_signed",
    "ROUNDING_MODES",
    "fmix32",
    "segment_salt",
    "parameter_key",
    "dither_words",
    "dither_field",
    "DITHER_MUL",
]

#: ``FlashConfig.rounding`` values: unbiased (default) or round-half-to-even.
ROUNDING_MODES = ("stochastic", "nearest")

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
INV_RHO = {
    127: float(torch.tensor(1.0 / 127, dtype=torch.float32)),
    32767: float(torch.tensor(1.0 / 32767, dtype=torch.float32)),
}

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


def _reciprocal(scale: torch.Tensor, numerator: float = 1.0, toward_zero: bool = False) -> torch.Tensor:
    """numerator/s per group (IEEE division, once per group), 0 for an all-zero group;
    ``toward_zero``: rounded toward zero instead of to nearest, so that x·(numerator/s) ≤
    numerator for every 0 ≤ x ≤ s (the √v codes then need no clamp at 255)."""
    s = scale.float()
    r = torch.where(s > 0, torch.full_like(s, numerator) / torch.where(s > 0, s, 1.0), 0.0)
    if toward_zero:  # r·s is exact in float64 (24 × 8 significant bits): one step down if above
        above = r.double() * s.double() > numerator
        r = torch.where(above, (r.view(torch.int32) - 1).view(torch.float32), r)
    return r


#: The square root of the second moment is taken for v ≥ 2^-101 only; below, v itself stands in
#: for √v (in Adam's denominator and in the √v codes). That is the range of the fast path of
#: the GPU's correctly rounded square root ([2^-101, FLT_MAX]), so the kernel needs no branch to
#: a slow path (docs/PERFORMANCE.md). Below 2^-101, √v < 2^-50.5: against eps = 1e-8 it is
#: below 1e-7 of the denominator either way, and such v code (and decode) to about zero.
SQRT_V_MIN = 2.0**-101


def sqrt_v(v: torch.Tensor) -> torch.Tensor:
    """√v correctly rounded for v ≥ 2^-101 (:data:`SQRT_V_MIN`), v itself below (and for NaN;
    √+inf = +inf). v ≥ 0."""
    return torch.where(v >= SQRT_V_MIN, sqrt_rn(v), v)


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


def split_master(
    master: torch.Tensor, dtype: torch.dtype, rho_dtype: torch.dtype, dither: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a fp32 master into (narrow param of ``dtype``, ρ of ``rho_dtype``). See module doc.

    ``dither``: random integers, one per element, for stochastic rounding of ρ — bf16 with int8
    ρ: 8 bits (:func:`dither_field` ``"rho"``); fp16: :func:`dither_field` ``"rho"`` (int8) or
    ``"rho16"`` (int16), see :func:`_sr_floor`. ``None`` rounds to nearest (bf16: ties away
    from zero; fp16: ties to even). bf16 with int16 ρ is exact and ignores it."""
    if master.dtype != torch.float32:
        raise TypeError(f"split_master expects a float32 master, got {master.dtype}")
    if dtype not in _NARROW_FORMATS:
        raise TypeError(f"split_master narrows to bfloat16 or float16, got {dtype}")
    n_levels = rho_levels(rho_dtype)
    if dtype == torch.bfloat16:
        return _split_bits(master, rho_dtype, dither)
    param = master.to(dtype)  # round to nearest even
    pf = param.float()
    finite = torch.isfinite(pf)
    diff = torch.where(finite, master - pf, 0.0)  # exact (Sterbenz): θ and θ' are within 2x
    # r = diff / (u/2) = (diff · 2^(mant+1)) · 2^-e: both products are exact (powers of two,
    # no overflow since |diff| ≤ u/2; a subnormal r is below 2^-126 and gives ρ = 0 anyway)
    mant = _NARROW_FORMATS[dtype][1]
    r = (diff * float(2 ** (mant + 1))) * _pow2(-_exponent(pf, dtype))
    r = torch.clamp(r, -1.0, 1.0) * float(n_levels)
    rho = _round_code(r) if dither is None else _sr_floor(r, dither, *_SR_GRID[rho_dtype])
    rho = torch.where(finite, rho, 0.0)
    return param, rho.to(rho_dtype)


_QNAN_BITS = 0x7FC00000


def _split_bits(master: torch.Tensor, rho_dtype: torch.dtype, dither: Optional[torch.Tensor]):
    """The bf16 bit split of the module doc, in int64 (unsigned 32-bit values)."""
    bits = master.contiguous().view(torch.int32).to(torch.int64) & _M32
    bits = torch.where(torch.isnan(master), _QNAN_BITS, bits)
    if rho_dtype == torch.int16:
        w = bits + 0x8000
        rho = (w & 0xFFFF) - 0x8000
    else:
        k = 0x80 if dither is None else dither.to(torch.int64)
        w = bits + k + 0x8000
        rho = ((w >> 8) & 0xFF) - 0x80
    hi = w >> 16  # ≤ 0xFF80 (NaN is 0x7FC0, −inf 0xFF80): no carry out of 32 bits
    param = (hi - ((hi & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)
    return param, rho.to(rho_dtype)


def _merge_bits(param: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    hi = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = rho.to(torch.int64) << (8 if rho.dtype == torch.int8 else 0)
    bits = ((hi << 16) + low) & _M32
    return (bits - ((bits & 0x80000000) << 1)).to(torch.int32).view(torch.float32)


def merge_master(param: torch.Tensor, rho: Optional[torch.Tensor], linear: bool = False) -> torch.Tensor:
    """Reconstruct the fp32 master from a narrow param and its ρ (module doc). ``linear``: ρ is
    in the linear form for bf16 too (state written by format versions ≤ 2)."""
    pf = param.float()
    if rho is None or param.dtype == torch.float32:
        return pf
    if param.dtype == torch.bfloat16 and not linear:
        return _merge_bits(param.reshape(-1), rho.reshape(-1)).view(param.shape)
    return _merge_linear(param, rho)


def _merge_linear(param: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """θ̂ = θ' + (ρ/N)·(u/2): the linear correction (fp16; bf16 before format version 3)."""
    pf = param.float()
    n_levels = rho_levels(rho.dtype)
    k = half_ulp_exponent(pf, param.dtype)
    delta = (rho.float() * INV_RHO[n_levels]) * _pow2(k)  # one rounding of the exact product
    return torch.where(torch.isfinite(pf), pf + delta, pf)


def rho_from_linear(param: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """ρ of the bit split for a bf16 ``param`` whose ``rho`` is in the linear form that format
    versions ≤ 2 stored (what checkpoints and state dicts of those versions hold).

    θ' stays as it is (the model's weights are loaded separately), so ρ is the offset of the old
    master θ̂ = θ' + (ρ/N)·(u/2) from θ' in the bit domain: for int16 exact up to fp32's rounding of
    θ̂; for int8 rounded to nearest in units of 2^-8 bf16 ULP, clamped to [−128, 127] (θ̂ = θ' + u/2
    exactly, ρ = 127, sits 128 units up: it loses one unit, 2^-16 relative). Other dtypes are
    returned unchanged (fp16 keeps the linear form)."""
    if param.dtype != torch.bfloat16 or rho is None:
        return rho
    theta = _merge_linear(param.reshape(-1), rho.reshape(-1))
    tb = theta.view(torch.int32).to(torch.int64) & _M32
    pb = (param.reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF) << 16
    # ρ adds to the magnitude bits (sign-magnitude); a master across zero from θ' (only possible
    # for θ' = ±0) becomes θ''s zero, and ρ never takes the magnitude below zero
    pm = pb & 0x7FFFFFFF
    diff = torch.where((tb >> 31) == (pb >> 31), (tb & 0x7FFFFFFF) - pm, -pm)
    diff = torch.where(torch.isfinite(param.reshape(-1).float()) & torch.isfinite(theta), diff, 0)
    if rho.dtype == torch.int8:
        lo = torch.clamp(-(pm >> 8), min=-128)
        diff = torch.maximum(torch.div(diff + 0x80, 256, rounding_mode="floor").clamp(max=127), lo)
    else:
        diff = torch.maximum(diff.clamp(max=0x7FFF), torch.clamp(-pm, min=-0x8000))
    return diff.to(rho.dtype).view(rho.shape)


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
    x: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0, dither: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Companded int8 codes and bf16 scales of a signed 1-D fp32 run starting at ``phase``.

    ``dither`` (:func:`dither_field` ``"m"``, one word per element) rounds the code
    stochastically (:func:`_sr_floor`); ``None`` rounds to nearest even."""
    xf = x.float().reshape(-1)
    finite = torch.isfinite(xf)
    g = _grouped(torch.where(finite, xf, 0.0), phase, group_size)
    scale = ceil_to_bf16(g.abs().amax(dim=1))
    xn = g * _reciprocal(scale)[:, None]
    y = (xn * float(2 * SIGNED_LEVELS)) / (1.0 + xn.abs())
    if dither is None:
        q = torch.clamp(_round_code(y), -SIGNED_LEVELS, SIGNED_LEVELS)
    else:  # |y| ≤ 127 + 2^-16 rounds onto [−127, 127] in _sr_floor's grid: no clamp (tested)
        q = _sr_floor(y, _grouped(dither, phase, group_size), *_SR_GRID[torch.int8, "codes"])
    return _ungroup(q, phase, xf.numel()).to(torch.int8), scale


def dequantize_signed(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> torch.Tensor:
    """Inverse of :func:`quantize_signed`: fp32 values of int8 companded codes,
    x = fl(q / (254 − |q|)) · s — the compander's inverse y/(2 − |y|) at y = q/127, as one
    correctly rounded quotient of two small integers (the kernel's cheapest exact form: a
    reciprocal estimate and two FMAs, see ``kernels/_jit._div_small``)."""
    q = _grouped(codes.float(), phase, group_size)
    x = q / (float(2 * SIGNED_LEVELS) - q.abs())
    return _ungroup(x * scales.float()[:, None], phase, codes.numel())


def quantize_sqrt(
    v: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0, dither: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of √v and bf16 scales (group max of √v) for a non-negative 1-D run.

    ``dither`` (:func:`dither_field` ``"v"``: 16-bit words k, one per element) rounds
    stochastically *unbiased in v*: with z = √v·(255/s), lo = ⌊z⌋ and u = k·2^-16, the code is
    lo + 1 when fma(lo, lo + 2u, u) = lo² + u·(2·lo + 1) < z² (exact), i.e. with probability
    (z² − lo²)/(2·lo + 1), so E[q²] = z² (to 2^-16 of the probability). ``None`` rounds z to
    nearest even."""
    vf = v.float().reshape(-1)
    ok = torch.isfinite(vf) & (vf > 0)
    r = sqrt_v(torch.where(ok, vf, 0.0))  # (v itself below 2^-101: SQRT_V_MIN)
    g = _grouped(r, phase, group_size)
    scale = ceil_to_bf16(g.amax(dim=1))
    # 255/s rounded toward zero: z ≤ 255 exactly, so lo + 1 ≤ 255 below without a clamp
    z = g * _reciprocal(scale, float(UNSIGNED_LEVELS), toward_zero=True)[:, None]
    if dither is None:
        q = _round_code(z)
    else:
        lo = torch.floor(z)
        u = _grouped(dither.float(), phase, group_size) * 2.0**-16
        # t = fma(lo, lo + 2u, u), compared with z² exactly (48 bits in float64), as the kernel's
        # fma(−z, z, t) does
        t = fma(lo, lo + (u + u), u)
        q = lo + (t.double() < z.double() * z.double()).float()
    q = torch.clamp(q, 0, UNSIGNED_LEVELS)
    return _ungroup(q, phase, vf.numel()).to(torch.uint8), scale


def dequantize_sqrt(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, phase: int = 0
) -> torch.Tensor:
    """Inverse of :func:`quantize_sqrt`: v = t², t = q·fl(s/255) with fl(s/255) = fl(s·fl(1/255))
    one product per group (the kernel makes t with one FMA per element)."""
    c = scales.float() * INV_UNSIGNED
    t = _grouped(codes.float(), phase, group_size) * c[:, None]
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


# ----------------------------------------------------------------------------------------------
# dither: the random bits of stochastic rounding, a pure function of canonical coordinates

_M32 = 0xFFFFFFFF
#: Odd multiplier of the per-element generator (2^32 / golden ratio, rounded to odd).
DITHER_MUL = 0x9E3779B9


def fmix32(x):
    """A 32-bit integer finalizer (the constants of MurmurHash3's fmix32, public domain): a
    bijection of uint32 whose every output bit depends on every input bit. ``x``: an int, or a
    uint64 numpy array (element-wise; the launch's per-tensor salts)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def parameter_key(seed: int, global_numel: int) -> int:
    """The 32-bit identity of a parameter in the dither: its seed and **global element count**.

    The count is the one identity every engine sees without names (a plain tensor, an FSDP2
    DTensor, an FSDP1 flat slice and a DeepSpeed fragment all know the global numel; only some
    know an FQN, and a single-device optimizer built from ``model.parameters()`` knows none), so
    the same parameter draws the same bits under every engine, which keeps N-rank = 1-rank and
    cross-engine continuation bit-exact. Parameters of equal size draw equal dithers at a given
    step and index: their rounding noise is correlated, which biases nothing (each rounding is
    unbiased on its own)."""
    return fmix32(fmix32(seed & _M32) ^ (global_numel & _M32) ^ fmix32((global_numel >> 32) + 0x6A09E667))


def segment_salt(key, step):
    """Per (parameter, step) salt of the generator (ints, or uint64 numpy arrays element-wise);
    the kernel launch computes the same once per tensor (kernels/fused_step._write_salts)."""
    return fmix32(key ^ fmix32(step & _M32))


def dither_words(global_index: torch.Tensor, salt: int) -> torch.Tensor:
    """32 random bits per element: ``x = (index + salt)·DITHER_MUL mod 2^32`` (int64 tensor).

    For a fixed element, the salt changes pseudo-randomly from step to step, so x is uniform over
    2^32 at every step and independent of the previous steps' — each disjoint bit field is a
    uniform dither of its own. Within one step the elements' words form a randomly shifted
    lattice (a Weyl sequence), which keeps the rounding errors of a group from piling up.
    Indices are taken modulo 2^32 (elements 2^32 apart share words).

    Fields (:func:`dither_field`): bits 24-31 round the first moment, bits 8-23 the second,
    bits 0-7 the bf16 bit split's ρ (fp16's linear ρ: bits 0-14, 0-6 for int16) — the cheapest
    extractions on the GPU (a shift folded into an
    add, a byte permute, a mask)."""
    idx = global_index.to(torch.int64) & _M32
    return ((idx + (salt & _M32)) * DITHER_MUL) & _M32


#: field → (shift, bits) of :func:`dither_field`
_FIELDS = {"m": (24, 8), "v": (8, 16), "rho": (0, 8), "rho_fp16": (0, 15), "rho16": (0, 7)}
#: (B, b) of :func:`_sr_floor` per rounded quantity: the binade of B has fp32 spacing 2^-b
_SR_GRID = {torch.int8: (384.0, 15), torch.int16: (98304.0, 7), (torch.int8, "codes"): (49152.0, 8)}


def dither_field(words: torch.Tensor, field: str) -> torch.Tensor:
    """The random integer of ``field`` ("m", "v", "rho" for bf16's ρ, "rho_fp16" / "rho16" for
    fp16's int8 / int16 ρ) from
    :func:`dither_words`: ``bits`` bits at ``shift`` (``_FIELDS``)."""
    shift, bits = _FIELDS[field]
    return (words >> shift) & ((1 << bits) - 1)


def _sr_floor(z: torch.Tensor, k: torch.Tensor, big: float, b: int) -> torch.Tensor:
    """⌊z + k·2^-b⌋ (k a b-bit random integer), computed as the kernel does.

    t = fl(z + B) lies in the binade of B, whose spacing is 2^-b (B = 1.5·2^(23−b): every
    |z| ≤ 2^(22−b) maps into it), so (t − B)·2^b is an exact integer: z rounded to nearest on
    that grid. Adding k and flooring the division by 2^b (a shift in the kernel) rounds up with
    probability frac(z) on the grid."""
    t = z + big
    fixed = ((t - big) * float(2**b)).to(torch.int64)
    return torch.div(fixed + k.to(torch.int64), 2**b, rounding_mode="floor").to(torch.float32)


def fma(a, b, c) -> torch.Tensor:
    """fp32 fused multiply-add: a·b + c rounded once to fp32 (round to nearest even), for any fp32
    operands (tensors or Python floats that are fp32 values; broadcast), as the GPU's FFMA.

    a·b is exact in float64 (24 + 24 bits). Its sum with c is rounded to float64 *to odd*: the
    round-to-nearest sum s and its exact error e (Knuth's two-sum, exact barring overflow, which
    fp32 operands cannot reach), then s's last bit forced to 1 by one step towards e when the sum
    was inexact and that bit is 0. A value rounded to odd with at least two more bits than the
    target rounds to the target exactly as the exact value would (Boldo & Melquiond, "Emulation
    of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008),
    so the final float64 → fp32 conversion is the single rounding of a fused FMA — where plain
    float64 arithmetic would round twice and differ about once in 2^29. Non-finite operands and
    results take the float64 path unchanged (the same inf/NaN as the FMA).

    Rounding twice can only go wrong where the float64 sum lies exactly halfway between two fp32
    values (or in fp32's subnormal range, where the halfway points sit elsewhere), so the
    rounding to odd is done only when some element is there: the reference's steps call this
    several times per tensor, and the common case then costs a few tensor operations."""
    a64 = a.double() if torch.is_tensor(a) else float(a)  # a Python float is an fp32 value here
    b64 = b.double() if torch.is_tensor(b) else float(b)
    c64 = c.double() if torch.is_tensor(c) else float(c)
    p = a64 * b64  # exact
    s = p + c64
    if not torch.is_tensor(s):
        s = torch.tensor(s, dtype=torch.float64)
    s = s.contiguous()
    bits = s.view(torch.int64)
    # halfway for a normal fp32 result: the 29 bits fp32 drops are exactly 1000…0
    suspect = ((bits & 0x1FFFFFFF) == 0x10000000) | ((s.abs() < 2.0**-126) & (s != 0))
    if not bool(suspect.any()):
        return s.float()
    cd = torch.as_tensor(c64, dtype=torch.float64, device=s.device)
    bb = s - p
    e = (p - (s - bb)) + (cd - bb)
    odd = (e != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    bits = torch.where(odd, bits + torch.where((e > 0) == (s > 0), 1, -1), bits)
    return bits.view(torch.float64).float()
