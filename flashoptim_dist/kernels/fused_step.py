"""One fused Triton kernel per optimizer family, launched once over a list of segments.

Each program handles ``NG`` canonical groups (``NG·G`` elements) of one segment: it loads the
narrow param, ρ, the gradient and the 8-bit moments, reconstructs the fp32 master, applies the
update of :mod:`flashoptim_dist.optim.reference` in fp32 registers, and writes back the narrow
param, ρ, codes and scales. Traffic for FlashAdamW-24 with bf16 grads: read 2+1+2+1+1, write
2+1+1+1 bytes per element plus 4 bytes of scales per 32 elements.

Segments may belong to different tensors. All tensors of one role (params, grads, ρ, each state's
codes and scales) share a dtype within a launch, so the kernel addresses them as element offsets
from one *base* tensor of that role: ``(tensor.data_ptr() - base.data_ptr()) // itemsize``. This
works identically on the GPU and under ``TRITON_INTERPRET=1``.

Blocks are aligned to canonical groups: a segment with phase ``p`` (its first element is the
``p``-th of its group) is covered in *aligned* coordinates ``a = local_index + p``, block ``b``
spanning ``a ∈ [b·NG·G, (b+1)·NG·G)``; so every block holds whole canonical groups and the group
absmax is a row reduction. Scale ``j`` of a segment is the group of aligned index ``j·G``.

Numerical contract: launched with ``enable_fp_fusion=False`` and using ``div_rn``/``sqrt_rn``,
every operation is an IEEE round-to-nearest fp32 operation in the reference's order, so results
match the reference bit for bit (tested under the interpreter, and on GPU through bench/).
bf16 rounding is done on the bit pattern (the interpreter truncates fp32→bf16 casts).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .. import numerics as nx
from ..optim.reference import HYPER_COLUMNS, N_HYPER

# Offsets table columns (int64 per segment).
_P, _G, _R, _S0, _C0, _S1, _C1, _LEN, _PHASE, _NCOLS = range(10)


@triton.jit
def _pow2(n):
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ldexp(x, n):
    n1 = tl.minimum(tl.maximum(n, -100), 100)
    return (x * _pow2(n1)) * _pow2(n - n1)


@triton.jit
def _is_finite(x):
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _half_ulp_exp(pf, EMIN: tl.constexpr, MANT: tl.constexpr):
    e = ((pf.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.maximum(e, EMIN) - MANT - 1


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
def _dequant_signed(q, s, INV_SIGNED: tl.constexpr):
    y = q.to(tl.float32) * INV_SIGNED
    x = tl.div_rn(y, 2.0 - tl.abs(y))
    return x * s


@triton.jit
def _dequant_sqrt(q, s, INV_UNSIGNED: tl.constexpr):
    t = (q.to(tl.float32) * INV_UNSIGNED) * s
    return t * t


@triton.jit
def _reciprocal(sbits):
    s = sbits.to(tl.float32, bitcast=True)
    pos = s > 0
    return tl.where(pos, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(pos, s, 1.0)), 0.0)


@triton.jit
def _quant_signed(m, mask):
    m = tl.where(mask & _is_finite(m), m, 0.0)
    sbits = _ceil_to_bf16_bits(tl.max(tl.abs(m), axis=1))
    xn = m * _reciprocal(sbits)[:, None]
    y = tl.div_rn(xn + xn, 1.0 + tl.abs(xn))
    q = tl.minimum(tl.maximum(tl.floor(y * 127.0 + 0.5), -127.0), 127.0)
    return q.to(tl.int8), sbits


@triton.jit
def _quant_sqrt(v, mask):
    ok = mask & _is_finite(v) & (v > 0)
    r = tl.sqrt_rn(tl.where(ok, v, 0.0))
    sbits = _ceil_to_bf16_bits(tl.max(r, axis=1))
    xn = r * _reciprocal(sbits)[:, None]
    q = tl.minimum(tl.maximum(tl.floor(xn * 255.0 + 0.5), 0.0), 255.0)
    return q.to(tl.uint8), sbits


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
    INV_RHO: tl.constexpr,
    INV_SIGNED: tl.constexpr,
    INV_UNSIGNED: tl.constexpr,
    N_STATES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIN: tl.constexpr,
    MANT: tl.constexpr,
    NCOLS: tl.constexpr,
    NHYPER: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid).to(tl.int64)
    a0 = tl.load(blk_start_ptr + pid)
    ob = offs_ptr + seg * NCOLS
    p_off = tl.load(ob + 0)
    g_off = tl.load(ob + 1)
    length = tl.load(ob + 7).to(tl.int32)
    phase = tl.load(ob + 8).to(tl.int32)

    rows = tl.arange(0, NG)
    a = a0 + rows[:, None] * G + tl.arange(0, G)[None, :]
    idx = a - phase
    mask = (idx >= 0) & (idx < length)
    grp = a0 // G + rows
    gmask = grp < (phase + length + G - 1) // G

    hb = hyper_ptr + seg * NHYPER
    h0 = tl.load(hb + 0)
    h1 = tl.load(hb + 1)
    h2 = tl.load(hb + 2)
    h3 = tl.load(hb + 3)
    h4 = tl.load(hb + 4)
    h5 = tl.load(hb + 5)
    h6 = tl.load(hb + 6)
    h7 = tl.load(hb + 7)
    sign = tl.load(hb + 8)

    # ---- decode
    pv = tl.load(p_base + p_off + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_RHO:
        r_off = tl.load(ob + 2)
        rho = tl.load(r_base + r_off + idx, mask=mask, other=0).to(tl.float32)
        delta = _ldexp(rho * INV_RHO, _half_ulp_exp(pv, EMIN, MANT))
        theta = tl.where(_is_finite(pv), pv + delta, pv)
    else:
        theta = pv
    g = tl.load(g_base + g_off + idx, mask=mask, other=0.0).to(tl.float32)
    g = g * sign

    if N_STATES >= 1:
        c0_off = tl.load(ob + 4)
        if QUANT:
            s0_off = tl.load(ob + 3)
            q0 = tl.load(c0_base + c0_off + idx, mask=mask, other=0)
            sc0 = tl.load(s0_base + s0_off + grp, mask=gmask, other=0.0).to(tl.float32)[:, None]
            st0 = _dequant_signed(q0, sc0, INV_SIGNED)
        else:
            st0 = tl.load(c0_base + c0_off + idx, mask=mask, other=0.0)
    if N_STATES >= 2:
        c1_off = tl.load(ob + 6)
        if QUANT:
            s1_off = tl.load(ob + 5)
            q1 = tl.load(c1_base + c1_off + idx, mask=mask, other=0)
            sc1 = tl.load(s1_base + s1_off + grp, mask=gmask, other=0.0).to(tl.float32)[:, None]
            st1 = _dequant_sqrt(q1, sc1, INV_UNSIGNED)
        else:
            st1 = tl.load(c1_base + c1_off + idx, mask=mask, other=0.0)

    # ---- update (mirrors optim/reference.py)
    if FAMILY == 0:  # adam: decay l2 w1 beta2 w2 eps step_size bc2_sqrt
        if DECOUPLED:
            theta = theta * h0
        else:
            g = g + h1 * theta
        st0 = st0 + h2 * (g - st0)
        st1 = st1 * h3 + (h4 * g) * g
        denom = tl.sqrt_rn(st1) * h7 + h5
        theta = theta + tl.div_rn((-h6) * st0, denom)
    elif FAMILY == 1:  # sgd: decay l2 momentum w_damp nesterov first lr
        if DECOUPLED:
            theta = theta * h0
        else:
            g = g + h1 * theta
        if N_STATES >= 1:
            st0 = tl.where(h5 != 0.0, g, st0 * h2 + h3 * g)
            g = tl.where(h4 != 0.0, g + h2 * st0, st0)
        theta = theta + (-h6) * g
    else:  # lion: decay _ beta1 w1 beta2 w2 lr
        theta = theta * h0
        c = st0 * h2 + h3 * g
        sgn = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        theta = theta + (-h6) * sgn
        st0 = st0 * h4 + h5 * g

    # ---- encode
    if N_STATES >= 1:
        if QUANT:
            q0n, sb0 = _quant_signed(st0, mask)
            tl.store(c0_base + c0_off + idx, q0n, mask=mask)
            tl.store(s0_base + s0_off + grp, (sb0 >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=gmask)
        else:
            tl.store(c0_base + c0_off + idx, st0, mask=mask)
    if N_STATES >= 2:
        if QUANT:
            q1n, sb1 = _quant_sqrt(st1, mask)
            tl.store(c1_base + c1_off + idx, q1n, mask=mask)
            tl.store(s1_base + s1_off + grp, (sb1 >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=gmask)
        else:
            tl.store(c1_base + c1_off + idx, st1, mask=mask)

    if NARROW == 0:
        tl.store(p_base + p_off + idx, theta, mask=mask)
    else:
        if NARROW == 1:
            nb = _rne_bf16_bits(theta)
            pn = nb.to(tl.int16).to(tl.bfloat16, bitcast=True)
            pf = (nb << 16).to(tl.float32, bitcast=True)
        else:
            pn = theta.to(tl.float16)
            pf = pn.to(tl.float32)
        tl.store(p_base + p_off + idx, pn, mask=mask)
        if HAS_RHO:
            fin = _is_finite(pf)
            diff = tl.where(fin, theta - pf, 0.0)
            r = _ldexp(diff, -_half_ulp_exp(pf, EMIN, MANT))
            r = tl.minimum(tl.maximum(r, -1.0), 1.0)
            rq = tl.where(fin, tl.floor(r * (RHO_N * 1.0) + 0.5), 0.0)
            if RHO_N == 127:
                tl.store(r_base + r_off + idx, rq.to(tl.int8), mask=mask)
            else:
                tl.store(r_base + r_off + idx, rq.to(tl.int16), mask=mask)


_FAMILY_ID = {"adam": 0, "sgd": 1, "lion": 2}
_NARROW = {torch.float32: (0, 0, 0), torch.bfloat16: (1, -126, 7), torch.float16: (2, -14, 10)}

#: Canonical groups per program (× G elements per block) and warps per program; overridable
#: through the environment for tuning (bench/step.py --sweep).
GROUPS_PER_BLOCK = int(os.environ.get("FLASHOPTIM_GROUPS_PER_BLOCK", "32"))
NUM_WARPS = int(os.environ.get("FLASHOPTIM_NUM_WARPS", "4"))


def _rel_offsets(tensors, base):
    """Element offsets of ``tensors`` relative to ``base`` (same dtype)."""
    if base is None:
        return np.zeros(len(tensors), dtype=np.int64)
    b = base.data_ptr()
    isz = base.element_size()
    ptrs = np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))
    diff = ptrs - b
    if isz > 1 and np.any(diff % isz):
        raise RuntimeError("tensor storage is not aligned to its element size; cannot address it from the base")
    return diff // isz


class KernelPlan:
    """Launch data for one fixed list of optimizer tensors, cached by the optimizer.

    Built once per set of tensors: the block table, the segment geometry and the offsets of the
    state tensors (ρ, codes, scales — owned by the optimizer, so they never move while the plan
    lives; ``load_state_dict`` drops all plans). Per step only the param and grad offsets and
    the hyper-parameter rows are recomputed.
    """

    def __init__(self, segs, rhos, codes, scales, quantized, group_size, device):
        # segs: list of (tensor index, local start, length, phase, scale offset)
        arr = np.asarray(segs, dtype=np.int64).reshape(-1, 5)
        self.seg_tensor = arr[:, 0].copy()
        self.seg_local = arr[:, 1].copy()
        self.group_size = group_size
        self.quantized = quantized
        self.rhos, self.codes, self.scales = rhos, codes, scales
        block = GROUPS_PER_BLOCK * group_size
        nblk = (arr[:, 3] + arr[:, 2] + block - 1) // block
        nblk[arr[:, 2] == 0] = 0
        self.n_blocks = int(nblk.sum())
        blk_seg = np.repeat(np.arange(len(nblk), dtype=np.int32), nblk)
        first = np.cumsum(nblk) - nblk
        within = np.arange(self.n_blocks, dtype=np.int64) - np.repeat(first, nblk)
        self.blk_seg = torch.from_numpy(blk_seg).to(device)
        self.blk_start = torch.from_numpy((within * block).astype(np.int32)).to(device)
        offs = np.zeros((len(arr), _NCOLS), dtype=np.int64)
        st = self.seg_tensor
        if rhos is not None:
            offs[:, _R] = _rel_offsets(rhos, rhos[0])[st] + self.seg_local
        for k, cc in enumerate(codes):
            offs[:, (_C0, _C1)[k]] = _rel_offsets(cc, cc[0])[st] + self.seg_local
            if quantized:
                offs[:, (_S0, _S1)[k]] = _rel_offsets(scales[k], scales[k][0])[st] + arr[:, 4]
        offs[:, _LEN] = arr[:, 2]
        offs[:, _PHASE] = arr[:, 3]
        self.offs = offs
        # pinned staging buffers, so the per-step host→device copies are asynchronous
        pin = device.type == "cuda"
        self._offs_host = torch.from_numpy(offs).pin_memory() if pin else torch.from_numpy(offs)
        self._offs_dev = torch.empty_like(self._offs_host, device=device)
        self._hyper_host = torch.zeros((len(arr), N_HYPER), dtype=torch.float32)
        if pin:
            self._hyper_host = self._hyper_host.pin_memory()
        self._hyper_dev = torch.empty_like(self._hyper_host, device=device)
        self._copied = None


def launch(plan: KernelPlan, family: str, decoupled: bool, params, grads, hyper_rows: np.ndarray) -> None:
    """Run one fused step over every segment of ``plan``.

    ``params``/``grads`` are the flat local tensors (one per optimizer tensor, in plan order);
    ``hyper_rows`` is ``[n_tensors, N_HYPER]`` (float64 or float32; rounded to fp32 here).
    """
    if plan.n_blocks == 0:
        return
    st = plan.seg_tensor
    # Wait (normally no wait at all) until the previous step's copies have left the pinned
    # staging buffers before overwriting them; this does not wait for the previous kernel.
    if plan._copied is not None:
        plan._copied.synchronize()
    offs = plan._offs_host.numpy()
    offs[:, _P] = _rel_offsets(params, params[0])[st] + plan.seg_local
    offs[:, _G] = _rel_offsets(grads, grads[0])[st] + plan.seg_local
    plan._hyper_host.numpy()[:] = hyper_rows[st]
    plan._offs_dev.copy_(plan._offs_host, non_blocking=True)
    plan._hyper_dev.copy_(plan._hyper_host, non_blocking=True)
    if plan._offs_dev.is_cuda:
        plan._copied = torch.cuda.Event()
        plan._copied.record()

    narrow, emin, mant = _NARROW[params[0].dtype]
    dummy = params[0]
    has_rho = plan.rhos is not None
    n_states = len(plan.codes)
    quantized = plan.quantized
    rho_n = (127 if plan.rhos[0].dtype == torch.int8 else 32767) if has_rho else 0

    _flash_step_kernel[(plan.n_blocks,)](
        plan.blk_seg,
        plan.blk_start,
        plan._offs_dev,
        plan._hyper_dev,
        params[0],
        grads[0],
        plan.rhos[0] if has_rho else dummy,
        plan.scales[0][0] if (n_states >= 1 and quantized) else dummy,
        plan.codes[0][0] if n_states >= 1 else dummy,
        plan.scales[1][0] if (n_states >= 2 and quantized) else dummy,
        plan.codes[1][0] if n_states >= 2 else dummy,
        FAMILY=_FAMILY_ID[family],
        DECOUPLED=decoupled,
        NARROW=narrow,
        HAS_RHO=has_rho,
        RHO_N=rho_n,
        INV_RHO=nx.INV_RHO.get(rho_n, 0.0),
        INV_SIGNED=nx.INV_SIGNED,
        INV_UNSIGNED=nx.INV_UNSIGNED,
        N_STATES=n_states,
        QUANT=quantized,
        EMIN=emin,
        MANT=mant,
        NCOLS=_NCOLS,
        NHYPER=N_HYPER,
        NG=GROUPS_PER_BLOCK,
        G=plan.group_size,
        enable_fp_fusion=False,
        num_warps=NUM_WARPS,
    )


assert len(HYPER_COLUMNS["adam"]) == N_HYPER
