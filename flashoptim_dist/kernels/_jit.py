"""The body of the fused step kernel (``@triton.jit`` functions only): see
:mod:`flashoptim_dist.kernels.fused_step` for what it computes, its numerical contract and how
it is launched (the plan and the host side live there)."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import numerics as nx
from ..reference import N_HYPER, SIGN_COLUMN, STEP_HI_COLUMN, STEP_LO_COLUMN

# Offsets table columns (int64 per segment). _GORIG: canonical index of the segment's aligned
# origin (global_start − phase); _TIDX: the segment's tensor, whose hyper-parameter row the
# kernel reads (rows per tensor, not per segment: a tensor-parallel column shard has one segment
# per row, ~10^5 per step at 8B).
_P, _G, _R, _S0, _C0, _S1, _C1, _LEN, _PHASE, _ALIGNED, _GORIG, _TIDX, _NCOLS = range(13)
_ROLES_ALIGN = (_P, _G, _R, _C0, _C1)  # element-indexed roles whose alignment matters
# the same columns as the kernel reads them (Triton takes globals only as constexpr)
_LEN_K, _PHASE_K, _ALIGNED_K, _GORIG_K, _TIDX_K = (tl.constexpr(c) for c in (_LEN, _PHASE, _ALIGNED, _GORIG, _TIDX))

_SIGN = SIGN_COLUMN  # hyper column of the gradient sign (−1 when maximizing), the same for every family
_DITHER_MUL = tl.constexpr(nx.DITHER_MUL)
STEP_LO = tl.constexpr(STEP_LO_COLUMN)
STEP_HI = tl.constexpr(STEP_HI_COLUMN)
#: The launch's copy of the hyper rows has one column more than the optimizer's: the bits of the
#: tensor's dither salt for this step (numerics.segment_salt), written by the launch
#: (fused_step._write_salts / _salt_kernel), so that no program spends ~25 instructions per
#: thread on loading the step and hashing it (docs/PERFORMANCE.md).
SALT = tl.constexpr(N_HYPER)
NHYPER_K = N_HYPER + 1


#: Largest finite fp32: |x| <= FLT_MAX is false exactly for ±inf and NaN (one compare).
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _finite(x):
    return tl.abs(x) <= _FLT_MAX


@triton.jit
def _rho_scale(pf, EMIN: tl.constexpr, C: tl.constexpr, ENCODE: tl.constexpr):
    """ρ's conversion factor for narrow values ``pf`` (exact in fp32), built on the exponent bits.

    With e' = max(e, EMIN) (EMIN = numerics._RHO_EMIN of the format) and u/2 = 2^(e'−mant−1):
    decode (ENCODE=False) returns fl(1/N)·u/2, encode returns N/(u/2). Both are a power of two
    times fl(1/N) or N, normal for every e' in [EMIN, 128] — ±inf/NaN (e = 128) included, so no
    clamp above — hence exact, and one multiply does what took three: ρ·fl(1/N)·u/2 rounded
    once equals fl(ρ·fl(1/N))·u/2, and (θ−θ')·N/(u/2) rounded once equals
    fl((θ−θ')·2^(mant+1)·2^−e'·N), the reference's order. ``C`` folds the constant bits
    (see ``_rho_constants``); the int32 arithmetic wraps, the result is in range.
    """
    eb = tl.maximum(pf.to(tl.int32, bitcast=True) & 0x7F800000, (EMIN + 127) << 23)
    if ENCODE:
        return (C - eb).to(tl.float32, bitcast=True)
    else:
        return (eb + C).to(tl.float32, bitcast=True)


@triton.jit
def _ceil_to_bf16_bits(x):
    """fp32 (non-negative, finite) → bf16 bits rounded up, saturating at bf16 max (as int32)."""
    b = x.to(tl.int32, bitcast=True)
    up = tl.where((b & 0xFFFF) != 0, b + 0x10000, b) & -65536
    up = tl.minimum(up, 0x7F7F0000)
    return up


@triton.jit
def _rne_bf16_bits(x):
    """fp32 → bf16 bit pattern (in the low 16 bits of an int32), round to nearest even."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r & 0xFFFF)
    return r


@triton.jit
def _int_to_f32(q, BIAS: tl.constexpr):
    """Exact fp32 value of an integer code q ≥ -BIAS (|q| < 2^22): the bits of 2^23 + BIAS + q
    read as a float, minus 2^23 + BIAS. One integer add and one fp32 add, where a plain
    conversion would use the quarter-rate conversion pipe."""
    return (q.to(tl.int32) + (0x4B000000 + BIAS)).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)


@triton.jit
def _byte_to_f32(q, SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    """Exact fp32 value of an 8-bit code (int8 if SIGNED, else uint8): as :func:`_int_to_f32`,
    but one ``prmt`` per element writes the code's byte straight into the low mantissa byte of
    2^23 (the int8 sign bit flipped once per 4 codes, which adds the bias 128), instead of a
    byte extract and an integer add."""
    return _byte_biased(q, SIGNED, INTERPRET) - (8388608.0 + (128.0 if SIGNED else 0.0))


@triton.jit
def _byte_biased(q, SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    """2^23 + q (+ 128 if SIGNED) as fp32, exactly: :func:`_byte_to_f32` before its subtraction."""
    if INTERPRET:
        return (q.to(tl.int32) + (0x4B000000 + (128 if SIGNED else 0))).to(tl.float32, bitcast=True)
    if SIGNED:
        bits = tl.inline_asm_elementwise(
            """{ .reg .b32 t; xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541;
            prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; }""",
            "=r,=r,=r,=r,r", [q], dtype=tl.int32, is_pure=True, pack=4,
        )
    else:
        bits = tl.inline_asm_elementwise(
            """prmt.b32 $0, $4, 0x4B000000, 0x7540; prmt.b32 $1, $4, 0x4B000000, 0x7541;
            prmt.b32 $2, $4, 0x4B000000, 0x7542; prmt.b32 $3, $4, 0x4B000000, 0x7543;""",
            "=r,=r,=r,=r,r", [q], dtype=tl.int32, is_pure=True, pack=4,
        )
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_int(z):
    """round(z), ties to even, as int32, for |z| < 2^22: adding 1.5·2^23 makes the fp32 adder
    round z to an integer held in the low mantissa bits."""
    return (z + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _div_normal(a, b, INTERPRET: tl.constexpr):
    """a/b correctly rounded, for a, b and a/b in fp32's normal range: the fast path of CUDA's
    ``div.rn`` (one Newton step on the reciprocal, one residual correction) without its range
    check and slow-path call. Used only for the compander's quotient 254x/(1+|x|), whose
    operands are in [-254.1, 254.1] × [1, 2]: bench/kernel_lab.py checks it against ``div_rn``
    on every fp32 x ∈ [0, 1.01] (the sign is symmetric), and quotients too small to be normal
    round to code 0 either way. Written in PTX so that ``-b`` folds into the FMAs
    (Triton lowers a negation to ``0 - b``, an extra instruction)."""
    if INTERPRET:
        r = 1.0 / b
        e = tl.fma(-b, r, 1.0)
        r = tl.fma(r, e, r)
        q = a * r
        res = tl.fma(-b, q, a)
        return tl.fma(res, r, q)
    else:
        return _div_asm(a, b, _DIV_REFINED)


@triton.jit
def _div_small(n, d, INTERPRET: tl.constexpr):
    """n/d correctly rounded for integers |n| ≤ 127 and d ∈ [127, 254] (the signed decoder's
    q/(254 − |q|)), in four instructions: r ≈ 1/d, q0 = n·r, the residual t = n − d·q0 (exact
    in one FMA), q0 + t·r (one FMA).

    Why it is exact (a proof, not a test): rcp.approx.f32 errs by at most 1 ULP (PTX ISA), so
    r = (1/d)(1 + ε), |ε| ≤ 2^-23, and q0 is within 1.5·2^-23 of n/d relatively. t is then a
    multiple of q0's ULP below ~800 ULPs, so the FMA computes it exactly, and q0 + t·r =
    n/d + (n/d − q0)·ε lies within 1.5·2^-46 of n/d (relative). A quotient of integers with
    d ≤ 254 is either exact in fp32 or not a dyadic rational; then its distance to the nearest
    rounding boundary of its binade is at least 2^-25/254 > 2^-33 relative, far above that
    error, so the final rounding is the correct one. bench/step.py also checks all 255 codes on
    the GPU. (:func:`_div_normal` needs a refined reciprocal: its operands are not integers.)"""
    if INTERPRET:
        return n / d
    else:
        return _div_asm(n, d, _DIV_SHORT)


# The two divisions in PTX ($1/$2): a reciprocal estimate, refined by one Newton step or not, then
# the quotient, its exact residual and one correction (CUDA's div.rn fast path, without its range
# check and slow-path call)
_DIV_REFINED = tl.constexpr("""{
            .reg .f32 r, e, q, t, nb;
            rcp.approx.ftz.f32 r, $2;
            neg.f32 nb, $2;
            fma.rn.f32 e, nb, r, 0f3F800000;
            fma.rn.f32 r, r, e, r;
            mul.rn.f32 q, $1, r;
            fma.rn.f32 t, nb, q, $1;
            fma.rn.f32 $0, t, r, q;
            }""")
_DIV_SHORT = tl.constexpr("""{
            .reg .f32 r, q, t, nb;
            rcp.approx.ftz.f32 r, $2;
            neg.f32 nb, $2;
            mul.rn.f32 q, $1, r;
            fma.rn.f32 t, nb, q, $1;
            fma.rn.f32 $0, t, r, q;
            }""")


@triton.jit
def _div_asm(a, b, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dequant_signed(q, s, INTERPRET: tl.constexpr):
    # numerics.dequantize_signed: x = q/(254 − |q|), times s. (A 256-entry table of x(q) read
    # with PTX loads was measured slower than the earlier, longer division: 4.80 vs 4.66 ms.)
    n = _byte_to_f32(q, True, INTERPRET)
    return _div_small(n, 254.0 - tl.abs(n), INTERPRET) * s


@triton.jit
def _dequant_sqrt(q, s, INV_UNSIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    # numerics.dequantize_sqrt: t = q·c, c = fl(s·fl(1/255)) per group. fma(2^23 + q, c, −2^23·c)
    # is that product rounded once (−2^23·c is exact: c ≤ 2^64/255, the largest √v scale, so
    # it cannot overflow), one instruction where the decoded integer would cost a subtraction
    c = s * INV_UNSIGNED
    if INTERPRET:  # the interpreter's fma is not fused: take the product itself
        t = _byte_to_f32(q, False, INTERPRET) * c
    else:
        t = tl.fma(_byte_biased(q, False, INTERPRET), c, c * -8388608.0)
    return t * t


@triton.jit
def _div(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt_v(v, EXACT: tl.constexpr, INTERPRET: tl.constexpr):
    """numerics.sqrt_v: √v correctly rounded for v ∈ [2^-101, FLT_MAX], v itself otherwise.

    That range is where ptxas's ``sqrt.rn.f32`` takes its fast path; the test below is its own
    (bits − 0x0D000000 ≤ 0x727FFFFF, unsigned) and the sequence is the one it emits there (rsqrt,
    x·y, y/2, one fma residual, one fma correction; read from the SASS of ``tl.sqrt_rn``), so the
    result is correctly rounded — without the branch, convergence barrier and slow-path call that
    ``sqrt.rn`` pays on every element. A select replaces the slow path."""
    if EXACT:
        if INTERPRET:
            fast = (v.to(tl.uint32, bitcast=True) - 0x0D000000) <= 0x727FFFFF
            return tl.where(fast, tl.sqrt_rn(v), v)
        else:
            return tl.inline_asm_elementwise(
                """{ .reg .f32 y, s, h, e, ns, r; .reg .b32 t; .reg .pred p;
                rsqrt.approx.ftz.f32 y, $1;
                mul.ftz.f32 s, $1, y;
                mul.ftz.f32 h, y, 0f3F000000;
                neg.f32 ns, s;
                fma.rn.f32 e, ns, s, $1;
                fma.rn.f32 r, e, h, s;
                sub.u32 t, $1, 0x0D000000;
                setp.le.u32 p, t, 0x727FFFFF;
                selp.f32 $0, r, $1, p; }""",
                "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1,
            )
    else:
        return tl.sqrt(v)


@triton.jit
def _fma(a, b, c, INTERPRET: tl.constexpr):
    """numerics.fma: a·b + c rounded once. The GPU's FFMA; under the interpreter, whose fma is
    not fused, numerics.fma itself (:func:`_fma_interpreted`)."""
    if INTERPRET:
        return _FMA_INTERPRETED(a, b, c)
    else:
        return tl.fma(a, b, c)


def _fma_interpreted(a, b, c):
    """numerics.fma on the interpreter's values, the numpy arrays behind its tensors' handles
    (``triton.runtime.interpreter.TensorHandle.data``; only ever called under
    TRITON_INTERPRET=1). One host call: the same emulation written in tl operations cost ~26
    interpreted operations per call and made the CPU test suite ~1.5x slower."""
    out = a * b + c  # a tensor of the broadcast shape and type; its values are replaced
    args = [torch.from_numpy(np.ascontiguousarray(t.handle.data, dtype=np.float32)) for t in (a, b, c)]
    out.handle.data = nx.fma(*args).numpy().reshape(out.handle.data.shape)
    return out


# (a constexpr: the compiler's dependency scan refuses plain Python functions in a kernel, even in
# the branch it never compiles)
_FMA_INTERPRETED = tl.constexpr(_fma_interpreted)


@triton.jit
def _reciprocal(sbits, NUM: tl.constexpr):
    """NUM/s per group (one division per group), 0 for an all-zero group."""
    s = sbits.to(tl.float32, bitcast=True)
    pos = s > 0
    return tl.where(pos, tl.div_rn(tl.full(s.shape, NUM, tl.float32), tl.where(pos, s, 1.0)), 0.0)


@triton.jit
def _reciprocal_rz(sbits, NUM: tl.constexpr, INTERPRET: tl.constexpr):
    """NUM/s rounded toward zero (numerics._reciprocal(toward_zero=True)), 0 for s = 0: the
    nearest quotient, one step down when it lies above (the sign of the exact residual r·s − NUM,
    from one fma; float64 under the interpreter, whose fma is not fused; s = 0 gives r = 0, never
    above)."""
    r = _reciprocal(sbits, NUM)
    s = sbits.to(tl.float32, bitcast=True)
    if INTERPRET:
        above = r.to(tl.float64) * s.to(tl.float64) > NUM
    else:
        above = tl.fma(r, s, -NUM) > 0.0
    return tl.where(above, (r.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), r)


@triton.jit
def _quant_signed(m, mask, dith, MASKED: tl.constexpr, INTERPRET: tl.constexpr, SR: tl.constexpr,
                  PERMUTE: tl.constexpr):
    # non-finite values become 0 and stay out of the group's scale
    ok = _finite(m)
    if MASKED:
        ok = ok & mask
    m = tl.where(ok, m, 0.0)
    sbits = _ceil_to_bf16_bits(tl.max(tl.abs(m), axis=1))
    xn = m * _reciprocal(sbits, 1.0)[:, None]
    y = _div_normal(xn * 254.0, 1.0 + tl.abs(xn), INTERPRET)
    # |xn| ≤ 1 + 2^-23 (s ≥ the group absmax, 1/s rounded), so |y| < 127.0001 rounds into
    # [-127, 127] to nearest: no clamp needed (the reference's clamp never acts); stochastic:
    # |y| ≤ 127 + 2^-16 lands on ±127 exactly in _sr_floor's 2^-15 grid, so no clamp either
    if SR and PERMUTE:  # B = 8: the code is byte 1 of (z + 49152)'s bits + k (_sr_floor before its shift)
        return _byte1((y + 49152.0).to(tl.int32, bitcast=True) + dith - 0x400000, False, INTERPRET), sbits
    if SR:
        return _sr_floor(y, dith, 49152.0, 8).to(tl.int8), sbits
    return _round_int(y).to(tl.int8), sbits


@triton.jit
def _byte1(x, FLIP: tl.constexpr, INTERPRET: tl.constexpr):
    """Byte 1 of each int32 as int8 (top bit flipped if FLIP): ``((x >> 8) ^ 0x80·FLIP).to(int8)``,
    but gathered by byte permutes straight into the packed int8 register, three per four
    values, where the shift cost one instruction per value before the packing."""
    if INTERPRET:
        return ((x >> 8) ^ (0x80 if FLIP else 0)).to(tl.int8)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; prmt.b32 a, $1, $2, 0x0051; prmt.b32 b, $3, $4, 0x0051; prmt.b32 $0, a, b, 0x5410; "
            + ("xor.b32 $0, $0, 0x80808080; }" if FLIP else "}"),
            "=r,r,r,r,r", [x], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _quant_sqrt(mask, sqrt_v, dith, MASKED: tl.constexpr, SR: tl.constexpr, INTERPRET: tl.constexpr):
    # sqrt_v = numerics.sqrt_v(v), already computed for Adam's denominator; v ≥ 0 by
    # construction, so the finiteness of sqrt_v is that of v (NaN and +inf stay NaN and +inf)
    ok = _finite(sqrt_v)
    if MASKED:
        ok = ok & mask
    r = tl.where(ok, sqrt_v, 0.0)
    sbits = _ceil_to_bf16_bits(tl.max(r, axis=1))
    # 0 ≤ z = r·rz(255/s) ≤ 255 exactly (r ≤ s, the reciprocal rounded toward zero): rounds into
    # [0, 255] to nearest, and ⌊z⌋ + 1 ≤ 255 below whenever it rounds up
    z = r * _reciprocal_rz(sbits, 255.0, INTERPRET)[:, None]
    if SR:
        # unbiased in v (numerics.quantize_sqrt): lo + 1 when lo² + u(2lo + 1) < z², u = k·2^-16;
        # the code is the low byte of ⌊z⌋ + 1.5·2^23's bits, plus one (lo = 255 never rounds up)
        tb, lo_f = _floor_bits(z, INTERPRET)
        # up = t < z² (z² exact), taken as the sign bit of fma(−z, z, t) = RN(t − z²): a
        # correctly rounded value is negative exactly when the exact one is (and +0 when it is
        # zero), so one FMA and one shift-add (LEA.HI) do what a multiply, a compare and a
        # select did
        diff = _fma(-z, z, _fma(lo_f, lo_f + (dith + dith), dith, INTERPRET), INTERPRET)
        q = tb + (diff.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    else:
        q = _round_int(z)
    return q.to(tl.uint8), sbits


@triton.jit
def _prefetch_l2(ptr, n: tl.constexpr):
    """Ask L2 for the ``n`` elements from ``ptr`` on (their byte count a multiple of 16; sm_90
    ``cp.async.bulk.prefetch.L2``, a hint: nothing is returned or waited for), from thread 0 of
    the program only. The address is rounded down to the 16 bytes the instruction requires,
    which stays in the same allocation; the last bytes of the range may then go unprefetched."""
    nbytes: tl.constexpr = n * (ptr.dtype.element_ty.primitive_bitwidth // 8)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; .reg .b64 a; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "and.b64 a, $1, -16; @p cp.async.bulk.prefetch.L2.global [a], $2; mov.b32 $0, 0; }",
        "=r,l,r", [ptr, tl.full((), nbytes, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _ld(ptr, mask, MASKED: tl.constexpr):
    """Load; masked (zero fill) only in edge blocks, so whole blocks load unmasked and vectorize."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _st(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _st_scale(ptr, sbits, mask, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a group's scale (bf16 in the high half of ``sbits``), one value per group.

    The scale is the result of a row reduction, so it lives in the reduction's layout, where the
    threads sharing a row hold copies. ``tl.store`` would first move it to the layout Triton
    picks for a contiguous 1-D store (one shared-memory round trip and two barriers per
    moment); the PTX store writes it from where it is, each copy to the same address."""
    if MASKED or INTERPRET:
        _st(ptr, _bf16_of_bits(sbits), mask, MASKED)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; st.global.b16 [$1], hi; mov.b32 $0, 0; }",
            "=r,l,r",
            [ptr, sbits],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _bf16_of_bits(bits):
    """bf16 whose bit pattern is the high half of the int32 ``bits`` (a scale from _ceil_to_bf16_bits)."""
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fmix32(x):
    """numerics.fmix32 on uint32 values (the salts of :func:`_salt_kernel`)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _salt_kernel(table_ptr, key_ptr, N, NHYPER: tl.constexpr, B: tl.constexpr):
    """The capturable step's salts: for each of the N rows of the launch's hyper table (on the
    device, computed there from the step tensors), SALT = bits of fmix32(key ^ fmix32(step)),
    the step read from its two exact fp32 halves (numerics.segment_salt)."""
    i = tl.program_id(0) * B + tl.arange(0, B)
    ok = i < N
    row = table_ptr + i * NHYPER
    step = tl.load(row + STEP_LO, mask=ok, other=0.0).to(tl.uint32) + (
        tl.load(row + STEP_HI, mask=ok, other=0.0).to(tl.uint32) << 24)
    salt = _fmix32(tl.load(key_ptr + i, mask=ok, other=0).to(tl.uint32) ^ _fmix32(step))
    tl.store(row + SALT, salt.to(tl.float32, bitcast=True), mask=ok)


@triton.jit
def _dither_base(gorig, salt):
    """The per-program constant c of numerics.dither_words: for aligned coordinate a the word is
    a·MUL + c = (gorig + a + salt)·MUL mod 2^32."""
    return (gorig + salt) * _DITHER_MUL


@triton.jit
def _sr_floor(z, k, BIG: tl.constexpr, B: tl.constexpr):
    """numerics._sr_floor, exact in the low byte (int8 codes, ρ) or two bytes (int16 ρ) that the
    caller keeps: the bits of z + BIG are those of 2^e (the power of two below BIG = 1.5·2^e)
    plus 2^22 plus z in fixed point with B fractional bits; add the B-bit random integer k,
    take away the 2^22, shift right by B, and what is left above the kept bytes is 2^e's
    exponent bits. One fp32 add, one three-input integer add, one shift."""
    return ((z + BIG).to(tl.int32, bitcast=True) + k - 0x400000) >> B


@triton.jit
def _v_dither(words, INTERPRET: tl.constexpr):
    """The √v field (bits 8-23 = k) as the float k·2^-16: the bits 0x43000000 | k are
    128 + k·2^-16 (one byte permute on the GPU), minus 128."""
    if INTERPRET:
        d = (((words >> 8) & 0xFFFF) | 0x43000000).to(tl.float32, bitcast=True)
    else:
        d = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x43000000, 0x7421;", "=r,r", [words],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return d - 128.0


@triton.jit
def _floor_bits(z, INTERPRET: tl.constexpr):
    """(the bits of ⌊z⌋ + 1.5·2^23 — ⌊z⌋ in the low bytes —, ⌊z⌋ as fp32) for 0 ≤ z < 2^22: the
    fp32 adder rounding *down* (add.rm), on the full-rate pipe."""
    if INTERPRET:
        t = tl.floor(z) + 12582912.0
    else:
        t = tl.inline_asm_elementwise("add.rm.f32 $0, $1, 0f4B400000;", "=r,r", [z], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return t.to(tl.int32, bitcast=True), t - 12582912.0


@triton.jit
def _step_block(
    p_ptr, g_ptr, r_ptr, s0_ptr, c0_ptr, s1_ptr, c1_ptr,
    a, grp, mask, gmask,
    h0, h1, h2, h3, h4, h5, h6, h7, sign, h9, dbase,
    FAMILY: tl.constexpr, DECOUPLED: tl.constexpr, NARROW: tl.constexpr, HAS_RHO: tl.constexpr,
    RHO_N: tl.constexpr, RHO_DEC: tl.constexpr, INV_UNSIGNED: tl.constexpr, N_STATES: tl.constexpr,
    QUANT: tl.constexpr, EMIN: tl.constexpr, MANT: tl.constexpr, RHO_ENC: tl.constexpr,
    EXACT: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr, MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
):
    """Decode → update → encode one block. Pointers are at the segment's *aligned origin*
    (element 0 of the canonical group holding its first element), ``a`` are aligned coordinates.
    With MASKED=False the whole block lies inside the segment: no masks, so loads vectorize.
    With SR, ``dbase`` is the program's dither constant (:func:`_dither_base`)."""
    if NARROW == 1 and HAS_RHO:  # bf16, the bit split (numerics): bits of θ̂ = (θ' << 16) + ρ·2^8 (int8) | + ρ (int16)
        pbits = _ld(p_ptr + a, mask, MASKED).to(tl.int16, bitcast=True).to(tl.int32) << 16
        rho = _ld(r_ptr + a, mask, MASKED).to(tl.int32)
        if RHO_N == 127:
            rho = rho << 8
        theta = (pbits + rho).to(tl.float32, bitcast=True)
    else:
        pv = _ld(p_ptr + a, mask, MASKED).to(tl.float32)
    g = _ld(g_ptr + a, mask, MASKED).to(tl.float32)
    if HAS_RHO and NARROW != 1:  # fp16: the linear correction
        rho = _ld(r_ptr + a, mask, MASKED)
        if RHO_N == 127:
            rho_f = _byte_to_f32(rho, True, INTERPRET)
        else:
            rho_f = _int_to_f32(rho, RHO_N + 1)
        theta = pv + rho_f * _rho_scale(pv, EMIN, RHO_DEC, False)
    elif not HAS_RHO:
        theta = pv
    if MAXIMIZE:  # some segment maximizes: sign = -1 there, +1 elsewhere (exact either way)
        g = g * sign

    if N_STATES >= 1:
        st0 = _ld(c0_ptr + a, mask, MASKED)
        if QUANT:
            st0 = _dequant_signed(st0, _ld(s0_ptr + grp, gmask, MASKED).to(tl.float32)[:, None], INTERPRET)
    if N_STATES >= 2:
        st1 = _ld(c1_ptr + a, mask, MASKED)
        if QUANT:
            st1 = _dequant_sqrt(st1, _ld(s1_ptr + grp, gmask, MASKED).to(tl.float32)[:, None], INV_UNSIGNED, INTERPRET)

    # ---- update (mirrors flashoptim_dist/reference.py)
    # (the multiply-adds are fused where reference.py fuses them: numerics.fma)
    if FAMILY == 0:  # adam: decay l2 w1 beta2 w2 eps step_size inv_bc2_sqrt
        if not DECOUPLED:
            g = _fma(h1, theta, g, INTERPRET)
        st0 = _fma(h2, g - st0, st0, INTERPRET)
        st1 = _fma(h4 * g, g, st1 * h3, INTERPRET)
        sqrt_v = _sqrt_v(st1, EXACT, INTERPRET)
        denom = _fma(sqrt_v, h7, h5, INTERPRET)
        if QUANT:  # the outlier bound (flashoptim_dist/reference.py): |m|/denom ≤ R_t = 1/h9
            denom = tl.maximum(denom, tl.abs(st0) * h9, propagate_nan=tl.PropagateNan.ALL)
        upd = _div((-h6) * st0, denom, EXACT)
        if DECOUPLED:
            theta = _fma(theta, h0, upd, INTERPRET)
        else:
            theta = theta + upd
    elif FAMILY == 1:  # sgd: decay l2 momentum w_damp nesterov first lr
        if DECOUPLED:
            theta = theta * h0
        else:
            g = _fma(h1, theta, g, INTERPRET)
        if N_STATES >= 1:
            st0 = tl.where(h5 != 0.0, g, _fma(st0, h2, h3 * g, INTERPRET))
            g = tl.where(h4 != 0.0, _fma(h2, st0, g, INTERPRET), st0)
        theta = _fma(-h6, g, theta, INTERPRET)
    else:  # lion: decay _ beta1 w1 beta2 w2 lr
        c = _fma(st0, h2, h3 * g, INTERPRET)
        # (−lr)·sign(c), torch.sign's sign(±0) = sign(NaN) = +0: for c ≠ 0 the bits of −lr with
        # c's sign bit flipped in (one LOP3, where two compares and two selects made ±1)
        nlr = -h6
        step = (nlr.to(tl.uint32, bitcast=True) ^ (c.to(tl.uint32, bitcast=True) & 0x80000000)).to(
            tl.float32, bitcast=True)
        theta = _fma(theta, h0, tl.where(tl.abs(c) > 0.0, step, nlr * 0.0), INTERPRET)
        st0 = _fma(st0, h4, h5 * g, INTERPRET)

    # ---- encode (the dither words are made here, not at the top: fewer live registers)
    if SR:
        words = a.to(tl.uint32) * _DITHER_MUL + dbase
    else:
        words = a
    if N_STATES >= 1:
        if QUANT:
            # (the byte-permute packing of the codes saves SGD and Lion ~1.3 instructions per
            # element; in Adam's longer kernel ptxas then schedules 3 more: bench/kernel_sass.py)
            q0n, sb0 = _quant_signed(st0, mask, (words >> 24).to(tl.int32) if SR else 0, MASKED, INTERPRET, SR,
                                     FAMILY != 0)
            _st(c0_ptr + a, q0n, mask, MASKED)
            _st_scale(s0_ptr + grp, sb0, gmask, MASKED, INTERPRET)
        else:
            _st(c0_ptr + a, st0, mask, MASKED)
    if N_STATES >= 2:
        if QUANT:
            dv = _v_dither(words, INTERPRET) if SR else 0.0
            q1n, sb1 = _quant_sqrt(mask, sqrt_v, dv, MASKED, SR, INTERPRET)
            _st(c1_ptr + a, q1n, mask, MASKED)
            _st_scale(s1_ptr + grp, sb1, gmask, MASKED, INTERPRET)
        else:
            _st(c1_ptr + a, st1, mask, MASKED)

    if NARROW == 1 and HAS_RHO:
        # w = b + k + 0x8000 on the bits b of θ (every NaN made 0x7FC00000 first: the GPU's own
        # NaN is 0x7FFFFFFF, which would carry into the sign); θ' = w >> 16, ρ = byte 1 of w
        # − 128 (int8: flipping the byte's top bit) or the low half − 0x8000 (int16, exact)
        tb = tl.where(theta == theta, theta.to(tl.uint32, bitcast=True), 0x7FC00000)
        if RHO_N == 127:
            if SR:
                w = tb + ((words & 0xFF).to(tl.uint32) + 0x8000)
            else:
                w = tb + 0x8080
            rq = _byte1(w.to(tl.int32, bitcast=True), True, INTERPRET)
        else:
            w = tb + 0x8000
            rq = ((w & 0xFFFF) ^ 0x8000).to(tl.int16)
        _st(p_ptr + a, (w >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask, MASKED)
        _st(r_ptr + a, rq, mask, MASKED)
    elif NARROW == 0:
        pn = theta
    elif NARROW == 1:
        if INTERPRET:  # the interpreter truncates fp32→bf16 casts: round on the bits
            nb = _rne_bf16_bits(theta)
            pn = nb.to(tl.int16).to(tl.bfloat16, bitcast=True)
            pf = (nb << 16).to(tl.float32, bitcast=True)
        else:  # cvt.rn.bf16.f32: round to nearest even in one instruction
            pn = theta.to(tl.bfloat16)
            pf = pn.to(tl.float32)
    else:
        pn = theta.to(tl.float16)
        pf = pn.to(tl.float32)
    if not (NARROW == 1 and HAS_RHO):
        _st(p_ptr + a, pn, mask, MASKED)
    if HAS_RHO and NARROW != 1:
        # r = (θ − θ')/(u/2) = (θ − θ')·2^(mant+1)·2^-e. θ' = RNE(θ) gives |θ − θ'| ≤ u/2 for
        # every finite θ' (at a binade edge the spacing below is u/2, so ≤ u/4), hence |r| ≤ 1
        # and the reference's clamp to [-1, 1] never acts; ρ = 0 for ±inf/NaN θ'
        r = (theta - pf) * _rho_scale(pf, EMIN, RHO_ENC, True)
        # that ρ = 0 is chosen on the float (r = 0 rounds to code 0 either way, ⌊0 + u⌋ = 0):
        # selecting on the packed int8 codes instead cost ~3 byte shuffles per element
        r = tl.where(_finite(pf), r, 0.0)
        if SR:  # |r| ≤ N exactly (above): ⌊r + u⌋ stays in [−N, N]
            if RHO_N == 127:
                rq = _sr_floor(r, (words & 0x7FFF).to(tl.int32), 384.0, 15)
            else:
                rq = _sr_floor(r, (words & 0x7F).to(tl.int32), 98304.0, 7)
        else:
            rq = _round_int(r)
        if RHO_N == 127:
            rq = rq.to(tl.int8)
        else:
            rq = rq.to(tl.int16)
        _st(r_ptr + a, rq, mask, MASKED)


@triton.jit
def _flash_step_kernel(
    blk_seg_ptr,
    blk_start_ptr,
    offs_ptr,
    hyper_ptr,
    p_base,
    g_base,
    r_base,
    s0_base,
    c0_base,
    s1_base,
    c1_base,
    FAMILY: tl.constexpr,  # 0 adam, 1 sgd, 2 lion
    DECOUPLED: tl.constexpr,
    NARROW: tl.constexpr,  # 0 fp32 param, 1 bf16, 2 fp16
    HAS_RHO: tl.constexpr,
    RHO_N: tl.constexpr,
    RHO_DEC: tl.constexpr,
    INV_UNSIGNED: tl.constexpr,
    N_STATES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIN: tl.constexpr,
    MANT: tl.constexpr,
    RHO_ENC: tl.constexpr,
    NCOLS: tl.constexpr,
    NHYPER: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    MASK_SPLIT: tl.constexpr,
    EXACT: tl.constexpr,
    INTERPRET: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_EVERY: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid).to(tl.int64)
    a0 = tl.multiple_of(tl.load(blk_start_ptr + pid), NG * G)
    ob = offs_ptr + seg * NCOLS
    length = tl.load(ob + _LEN_K).to(tl.int32)
    phase = tl.load(ob + _PHASE_K).to(tl.int32)
    aligned = tl.load(ob + _ALIGNED_K)  # every role's origin offset is a multiple of 16 elements

    n_groups = (phase + length + G - 1) // G

    hb = hyper_ptr + tl.load(ob + _TIDX_K) * NHYPER  # the segment's tensor's row
    h0 = tl.load(hb + 0)
    h1 = tl.load(hb + 1)
    h2 = tl.load(hb + 2)
    h3 = tl.load(hb + 3)
    h4 = tl.load(hb + 4)
    h5 = tl.load(hb + 5)
    h6 = tl.load(hb + 6)
    h7 = tl.load(hb + 7)
    sign = tl.load(hb + 8)
    h9 = tl.load(hb + 9)
    if SR:  # the program's dither constant; the int64 column wraps to uint32 on purpose
        dbase = _dither_base(tl.load(ob + _GORIG_K).to(tl.uint32), tl.load(hb + SALT).to(tl.uint32, bitcast=True))
    else:
        dbase = 0

    # origin offsets (element 0 of the segment's first canonical group); the offsets table
    # stores them already shifted by -phase, scales start at the segment's first group
    p_o = tl.load(ob + 0)
    g_o = tl.load(ob + 1)
    r_o = tl.load(ob + 2)
    s0_o = tl.load(ob + 3)
    c0_o = tl.load(ob + 4)
    s1_o = tl.load(ob + 5)
    c1_o = tl.load(ob + 6)
    full = (a0 >= phase) & (a0 + NG * G <= phase + length)
    if full & (aligned != 0):
        if PREFETCH > 0 and not INTERPRET:
            # Latency hiding without registers: one program in PF_EVERY asks L2 for everything
            # the PF_EVERY programs PREFETCH further on will read — their rows of the block
            # table, and, when they are blocks of this segment, their bytes of every role and
            # their scales. Programs start in index order, so those run about a wave later and
            # find their bytes in L2 instead of DRAM. Bulk prefetches issued by one thread:
            # nothing is returned, no register is held (a program looping over several blocks
            # with its loads pipelined through shared memory spilled its loop-carried values at
            # 64 registers and was slower: docs/PERFORMANCE.md, eighth session).
            if pid % PF_EVERY == 0:
                if pid + PREFETCH + PF_EVERY <= tl.num_programs(0):
                    _prefetch_l2(blk_seg_ptr + pid + PREFETCH, PF_EVERY)
                    _prefetch_l2(blk_start_ptr + pid + PREFETCH, PF_EVERY)
                nxt = a0 + PREFETCH * (NG * G)
                if nxt + PF_EVERY * NG * G <= phase + length:
                    _prefetch_l2(p_base + p_o + nxt, PF_EVERY * NG * G)
                    _prefetch_l2(g_base + g_o + nxt, PF_EVERY * NG * G)
                    if HAS_RHO:
                        _prefetch_l2(r_base + r_o + nxt, PF_EVERY * NG * G)
                    if N_STATES >= 1:
                        _prefetch_l2(c0_base + c0_o + nxt, PF_EVERY * NG * G)
                        if QUANT:
                            _prefetch_l2(s0_base + s0_o + nxt // G, PF_EVERY * NG)
                    if N_STATES >= 2:
                        _prefetch_l2(c1_base + c1_o + nxt, PF_EVERY * NG * G)
                        if QUANT:
                            _prefetch_l2(s1_base + s1_o + nxt // G, PF_EVERY * NG)
        rows = tl.arange(0, NG)
        a = a0 + rows[:, None] * G + tl.arange(0, G)[None, :]
        # group index per row from an arange (not a reduction over ``a``: that made the compiler
        # give the whole tile a one-element-per-thread layout with 5 shuffle rounds per reduction)
        grp = a0 // G + rows
        _step_block(
            p_base + tl.multiple_of(p_o, 16), g_base + tl.multiple_of(g_o, 16), r_base + tl.multiple_of(r_o, 16),
            s0_base + s0_o, c0_base + tl.multiple_of(c0_o, 16), s1_base + s1_o, c1_base + tl.multiple_of(c1_o, 16),
            a, grp, a, grp, h0, h1, h2, h3, h4, h5, h6, h7, sign, h9, dbase,
            FAMILY, DECOUPLED, NARROW, HAS_RHO, RHO_N, RHO_DEC, INV_UNSIGNED, N_STATES, QUANT, EMIN, MANT,
            RHO_ENC, EXACT, False, INTERPRET, MAXIMIZE, SR,
        )
    else:
        # Edge blocks (a segment's first/last block, or unaligned storage): masked accesses
        # cannot be vectorized, so the compiler gives them one element per thread and a 64-bit
        # address each; done in MASK_SPLIT sub-tiles so this path does not set the register
        # count (and so the occupancy) of the whole kernel. One block per program: a loop over
        # several blocks of a segment was measured slower (it serializes each program's loads).
        # (names differ from the other branch: Triton wants same-named values to match in shape)
        for c in range(MASK_SPLIT):
            rows_e = c * (NG // MASK_SPLIT) + tl.arange(0, NG // MASK_SPLIT)
            a_e = a0 + rows_e[:, None] * G + tl.arange(0, G)[None, :]
            grp_e = a0 // G + rows_e
            _step_block(
                p_base + p_o, g_base + g_o, r_base + r_o, s0_base + s0_o, c0_base + c0_o, s1_base + s1_o,
                c1_base + c1_o, a_e, grp_e, (a_e >= phase) & (a_e < phase + length), grp_e < n_groups,
                h0, h1, h2, h3, h4, h5, h6, h7, sign, h9, dbase,
                FAMILY, DECOUPLED, NARROW, HAS_RHO, RHO_N, RHO_DEC, INV_UNSIGNED, N_STATES, QUANT, EMIN, MANT,
                RHO_ENC, EXACT, True, INTERPRET, MAXIMIZE, SR,
            )
