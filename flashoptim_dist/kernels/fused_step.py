"""One fused Triton kernel per optimizer family, launched once over a list of segments.

Each program handles ``NG`` canonical groups (``NG·G`` elements) of one segment: it loads the
narrow param, ρ, the gradient and the 8-bit moments, reconstructs the fp32 master (for bf16: its
bit pattern, (θ' << 16) + ρ·2^8), applies the
update of :mod:`flashoptim_dist.reference` in fp32 registers, and writes back the narrow
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

Numerical contract: launched with ``enable_fp_fusion=False`` and using ``div_rn``, correctly
rounded square roots and explicit FMAs exactly where the reference has ``numerics.fma``, every
operation is an IEEE round-to-nearest fp32 operation in the reference's order, so results match
the reference bit for bit (tested under the interpreter, and on GPU through bench/step.py, which
also checks the helpers below on 6.7e7 inputs and both decoders on every code and scale). The
compander's quotient uses ``_div_normal`` (the ``div.rn`` fast path without its range check),
shown identical to ``div_rn`` on every input that can reach it (bench/kernel_lab.py); its inverse
q/(254 − |q|) uses ``_div_small``, proved exact for those integer operands. Adam's √v is
``sqrt.rn``'s own fast path with a select for v outside [2^-101, FLT_MAX] (``_sqrt_v``;
numerics.sqrt_v is its specification). The bf16 master split (ρ) is integer arithmetic on the
bit pattern (numerics module doc). The dither salt of each tensor's step is computed once per
launch (``_write_salts``; ``_salt_kernel`` for the capturable step), not per program.

fp32→bf16 uses the GPU's round-to-nearest-even cvt; under the interpreter, which truncates that
cast, the rounding is done on the bit pattern instead.

Latency hiding: one program in ``PF_EVERY`` asks L2 for what the programs ``PREFETCH`` further
on will read (bulk prefetches by one thread; no registers, no results: see the kernel). It is a
hint and changes no result.

The kernel body is in :mod:`._jit`; this module holds the launch side (plan, arguments, knobs).
Its measured cost, what bounds it and the history of its optimisations are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton

from .. import numerics as nx
from ..reference import HYPER_COLUMNS, N_HYPER, STEP_HI_COLUMN, STEP_LO_COLUMN, STEP_SPLIT

# The kernel body (@triton.jit) and the columns of its offsets table are in ._jit
from ._jit import (
    _ALIGNED,
    _C0,
    _C1,
    _G,
    _GORIG,
    _LEN,
    _NCOLS,
    _P,
    _PHASE,
    _R,
    _ROLES_ALIGN,
    _S0,
    _S1,
    _SIGN,
    _TIDX,
)
from ._jit import NHYPER_K, _flash_step_kernel, _salt_kernel

# re-exported: tests and bench/ reach these kernel helpers through this module
from ._jit import _dequant_signed, _div_normal, _div_small, _int_to_f32, _round_int  # noqa: F401

_FAMILY_ID = {"adam": 0, "sgd": 1, "lion": 2}
#: param dtype → (NARROW id, ρ's exponent floor, explicit mantissa bits)
_NARROW = {
    torch.float32: (0, 0, 0),
    torch.bfloat16: (1, nx._RHO_EMIN[torch.bfloat16], 7),
    torch.float16: (2, nx._RHO_EMIN[torch.float16], 10),
}


def _f32_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _wrap_i32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def _rho_constants(rho_n: int, mant: int):
    """Constant bits of :func:`_rho_scale` (0, 0 without ρ): decode fl(1/N)·2^(e'−mant−1) is
    ``eb + RHO_DEC``, encode N·2^(mant+1−e') is ``RHO_ENC − eb``, eb = (e'+127)<<23."""
    if not rho_n:
        return 0, 0
    shift = (128 + mant) << 23  # (127 + mant + 1) in the exponent field
    return _wrap_i32(_f32_bits(nx.INV_RHO[rho_n]) - shift), _wrap_i32(_f32_bits(float(rho_n)) + shift)


#: Canonical groups per program (× G elements per block), warps per program and an optional
#: register cap per thread; overridable through the environment for tuning. 32 groups × 4
#: warps = 8 elements per thread (16-byte bf16 accesses, 2 shuffle rounds per group
#: reduction), with each family's register cap below: the fastest of the sweeps in
#: docs/PERFORMANCE.md.
GROUPS_PER_BLOCK = int(os.environ.get("FLASHOPTIM_GROUPS_PER_BLOCK", "32"))
NUM_WARPS = int(os.environ.get("FLASHOPTIM_NUM_WARPS", "4"))
_env_maxnreg = os.environ.get("FLASHOPTIM_MAXNREG")
#: Register cap for every family (0: none); None: the family's own (FAMILY_MAXNREG).
MAXNREG = int(_env_maxnreg) if _env_maxnreg else None
#: Register cap per family, from the H200 sweeps in docs/PERFORMANCE.md (GPU time per step):
#: Adam 64 (3.96–3.98 ms; 72 4.04, 56 spills more, uncapped 4.4; seventh session, runs B and C;
#: with the L2 prefetch 3.89–3.95 at 64 against 4.00–4.01 at 72 and 4.09–4.33 at 60/56, eighth
#: session); SGD 48 (2.71 ms against 2.77 at 40 and 2.70 at 56, run C); Lion 56 since the L2
#: prefetch (2.43–2.45 ms against 2.76–2.77 at 48 and 2.46–2.49 at 64, eighth session; before
#: it, 48 was best).
FAMILY_MAXNREG = {"adam": 64, "sgd": 48, "lion": 56}


def _maxnreg(family: str):
    """The register cap of a launch (None: uncapped)."""
    cap = FAMILY_MAXNREG[family] if MAXNREG is None else MAXNREG
    return cap or None


#: L2 prefetch (see the kernel): one program in PF_EVERY asks L2 for what the PF_EVERY programs
#: PREFETCH further on will read; PREFETCH 0 turns it off. From the H200 sweeps in
#: docs/PERFORMANCE.md (2026-12-04, eighth session): FlashAdamW-24 3.75–3.81 ms at 1024 / 32
#: against 3.97–3.99 without, 3.82–3.87 at 512 or 1024 / 16. PF_EVERY must be a multiple of 4
#: (the prefetched sizes are multiples of 16 bytes).
PREFETCH = int(os.environ.get("FLASHOPTIM_PREFETCH", "1024"))
PF_EVERY = int(os.environ.get("FLASHOPTIM_PF_EVERY", "32"))


def _check_prefetch(prefetch: int, every: int, groups: int) -> None:
    """The prefetch sizes (PF_EVERY·4 bytes of each block-table column, PF_EVERY·NG·2 bytes of
    scales, more for the other roles) must be multiples of 16 bytes, or the instruction faults."""
    if prefetch < 0 or (prefetch and (every <= 0 or every % 4 or every * groups % 8)):
        raise ValueError(
            f"FLASHOPTIM_PREFETCH={prefetch} / FLASHOPTIM_PF_EVERY={every} (with {groups} groups per block): "
            "the prefetch distance must be >= 0 and PF_EVERY a positive multiple of 4 with PF_EVERY x groups "
            "a multiple of 8; unset both for the defaults (1024 / 32) or set FLASHOPTIM_PREFETCH=0 to turn "
            "the L2 prefetch off")


_check_prefetch(PREFETCH, PF_EVERY, GROUPS_PER_BLOCK)  # bad environment values fail at import, before any step


#: Sub-tiles of a masked edge block (see the kernel).
MASK_SPLIT = int(os.environ.get("FLASHOPTIM_MASK_SPLIT", "4"))


_data_ptr = torch.Tensor.data_ptr


def _offsets(ptrs, itemsize: int) -> np.ndarray:
    """Element offsets of the addresses ``ptrs`` from the first one (tensors of one dtype)."""
    diff = np.array(ptrs, dtype=np.int64) - ptrs[0]
    if itemsize > 1 and np.any(diff % itemsize):
        raise RuntimeError("tensor storage is not aligned to its element size; cannot address it from the base")
    return diff // itemsize


def _rel_offsets(tensors):
    """Element offsets of ``tensors`` (one dtype) from the first one."""
    return _offsets(list(map(_data_ptr, tensors)), tensors[0].element_size())


#: Longest segment the kernel addresses in one row: its aligned coordinates are int32.
MAX_SEGMENT = 2**30


def _split_long(arr: np.ndarray, group_size: int) -> np.ndarray:
    """Cut segment rows longer than :data:`MAX_SEGMENT` at canonical group boundaries.

    A row is (tensor, local start, length, phase, scale offset, global start, dither key); a
    piece starting ``d`` elements into a row, with ``phase + d`` a multiple of the group size,
    has phase 0, its scales ``(phase + d) / G`` further on and the same canonical indices, so
    the kernel computes the same bits as for the whole row. (Without the cut, a tensor of more
    than 2^31 elements on one rank — a 256k × 8192 embedding — would wrap the int32 block
    coordinates.)"""
    if not len(arr) or arr[:, 2].max() <= MAX_SEGMENT:
        return arr
    chunk = max(group_size, MAX_SEGMENT // group_size * group_size)
    rows = []
    for t, start, n, phase, s_off, g_start, key in arr.tolist():
        d = 0
        while True:
            # the first piece keeps the row's phase; later ones start on a group boundary
            end = min(n, chunk - phase if d == 0 else d + chunk)
            ph = phase if d == 0 else 0
            rows.append((t, start + d, end - d, ph, s_off + (phase + d - ph) // group_size, g_start + d, key))
            if end >= n:
                break
            d = end
    return np.asarray(rows, dtype=np.int64).reshape(-1, 7)


class KernelPlan:
    """Launch data for one fixed list of optimizer tensors, cached by the optimizer.

    Built once per set of tensors: the block table, the segment geometry and the offsets of the
    state tensors (ρ, codes, scales — owned by the optimizer, so they never move while the plan
    lives; ``load_state_dict`` drops all plans). Per step only the param and grad offsets and
    the hyper-parameter rows are recomputed.
    """

    def __init__(self, segs, rhos, codes, scales, quantized, group_size, device, stochastic=False):
        # segs: list of (tensor index, local start, length, phase, scale offset, global start,
        # dither key)
        arr = _split_long(np.asarray(segs, dtype=np.int64).reshape(-1, 7), group_size)
        self.stochastic = stochastic
        self.seg_tensor = arr[:, 0].copy()
        self.seg_local = arr[:, 1].copy()
        # aligned origin: element 0 of the canonical group holding the segment's first element
        self.seg_origin = arr[:, 1] - arr[:, 3]
        self.group_size = group_size
        self.quantized = quantized
        self.rhos, self.codes, self.scales = rhos, codes, scales
        self.groups_per_block = GROUPS_PER_BLOCK  # the block table below is built for it
        block = self.groups_per_block * group_size
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
            offs[:, _R] = _rel_offsets(rhos)[st] + self.seg_origin
        for k, cc in enumerate(codes):
            offs[:, (_C0, _C1)[k]] = _rel_offsets(cc)[st] + self.seg_origin
            if quantized:
                offs[:, (_S0, _S1)[k]] = _rel_offsets(scales[k])[st] + arr[:, 4]
        offs[:, _LEN] = arr[:, 2]
        offs[:, _PHASE] = arr[:, 3]
        offs[:, _GORIG] = (arr[:, 5] - arr[:, 3]) & 0xFFFFFFFF
        offs[:, _TIDX] = arr[:, 0]
        self.offs = offs
        # pinned staging buffers, so the per-step host→device copies are asynchronous
        pin = device.type == "cuda"
        self._offs_host = torch.from_numpy(offs).pin_memory() if pin else torch.from_numpy(offs)
        self._offs_dev = torch.empty_like(self._offs_host, device=device)
        # one row per tensor (the kernel reads the row of its segment's tensor): the per-step
        # host work and copy are O(tensors) however many segments the tensors are cut into
        self.n_tensors = int(arr[:, 0].max()) + 1 if len(arr) else 0
        # each tensor's dither key (numerics.parameter_key: every segment of a tensor has its
        # tensor's), for the per-step salts of the table's last column (_write_salts)
        keys = np.zeros(self.n_tensors, dtype=np.int64)
        keys[arr[:, 0]] = arr[:, 6]
        if len(arr) and np.any(keys[arr[:, 0]] != arr[:, 6]):
            raise RuntimeError("segments of one tensor carry different dither keys: the kernel plan is inconsistent")
        self.tensor_keys = (keys & 0xFFFFFFFF).astype(np.uint32)
        self._keys_dev = None  # on the device, for the capturable step's salts (made on first use)
        self._hyper_host = torch.zeros((self.n_tensors, NHYPER_K), dtype=torch.float32)
        if pin:
            self._hyper_host = self._hyper_host.pin_memory()
        self._hyper_dev = torch.empty_like(self._hyper_host, device=device)
        self._copied = None
        self._ptrs = None  # (param addresses, grad addresses) of the last launch
        # capturable step: offsets staged while a CUDA graph was being captured; each buffer is
        # read by its graph's copy at every replay, so it is kept and never written again
        self._graph_offs = []
        self._kwargs = {}


#: False only in bench/step.py's measurement of what bit-exactness costs: approximate division
#: and square root with FMA contraction. The optimizer always runs EXACT (matches the reference).
EXACT = True

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_kwargs(plan: KernelPlan, family: str, decoupled: bool, dtype: torch.dtype, maximize: bool) -> dict:
    """The launch's compile-time arguments (cached per plan: computing them costs host time)."""
    key = (family, decoupled, dtype, maximize, EXACT, MAXNREG, NUM_WARPS, PREFETCH, PF_EVERY)  # (SR is fixed per plan)
    kw = plan._kwargs.get(key)
    if kw is None:
        _check_prefetch(PREFETCH, PF_EVERY, plan.groups_per_block)
        narrow, emin, mant = _NARROW[dtype]
        maxnreg = None if INTERPRETING else _maxnreg(family)
        has_rho = plan.rhos is not None
        rho_n = (127 if plan.rhos[0].dtype == torch.int8 else 32767) if has_rho else 0
        rho_dec, rho_enc = _rho_constants(rho_n, mant)
        kw = plan._kwargs[key] = dict(
            FAMILY=_FAMILY_ID[family],
            DECOUPLED=decoupled,
            NARROW=narrow,
            HAS_RHO=has_rho,
            RHO_N=rho_n,
            RHO_DEC=rho_dec,
            INV_UNSIGNED=nx.INV_UNSIGNED,
            N_STATES=len(plan.codes),
            QUANT=plan.quantized,
            EMIN=emin,
            MANT=mant,
            RHO_ENC=rho_enc,
            NCOLS=_NCOLS,
            NHYPER=NHYPER_K,
            NG=plan.groups_per_block,
            MASK_SPLIT=min(MASK_SPLIT, plan.groups_per_block),
            G=plan.group_size,
            EXACT=EXACT,
            INTERPRET=INTERPRETING,
            MAXIMIZE=maximize,
            SR=plan.stochastic and (has_rho or plan.quantized),
            PREFETCH=PREFETCH,
            PF_EVERY=PF_EVERY,
            enable_fp_fusion=not EXACT,
            num_warps=NUM_WARPS,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )
    return kw


def _stage_offsets(plan: KernelPlan, ptrs, params, grads) -> None:
    """Rebuild the offsets table for moved params/grads and copy it to the device."""
    capturing = plan._offs_dev.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing:
        # a graph replays this copy from the same host buffer: give it one of its own (pinned
        # memory, allocated outside the stream; no event is recorded while capturing)
        host = torch.empty(plan._offs_host.shape, dtype=plan._offs_host.dtype, pin_memory=True)
        plan._graph_offs.append(host)
    else:
        if plan._copied is not None:
            plan._copied.synchronize()
        host = plan._offs_host
    offs = host.numpy()
    if capturing:
        offs[:] = plan.offs
    st = plan.seg_tensor
    offs[:, _P] = _offsets(ptrs[0], params[0].element_size())[st] + plan.seg_origin
    offs[:, _G] = _offsets(ptrs[1], grads[0].element_size())[st] + plan.seg_origin
    # blocks of a segment whose every origin is 16-element aligned load and store vectorized
    offs[:, _ALIGNED] = np.all(offs[:, _ROLES_ALIGN] % 16 == 0, axis=1)
    plan._offs_dev.copy_(host, non_blocking=True)
    plan._ptrs = None if capturing else ptrs  # the next eager launch restages its own
    if plan._offs_dev.is_cuda and not capturing:
        if plan._copied is None:
            plan._copied = torch.cuda.Event()
        plan._copied.record()


def _write_salts(table: np.ndarray, keys: np.ndarray, rows) -> None:
    """The last column of the launch's hyper table (fp32 ``table``, one row per tensor): the bits
    of each tensor's dither salt for its step, numerics.segment_salt(key, step) (the step from
    ``rows``' two exact halves). Computed here once per tensor instead of in every thread of
    every program of the kernel."""
    step = (np.asarray(rows[:, STEP_LO_COLUMN], dtype=np.float64)
            + np.asarray(rows[:, STEP_HI_COLUMN], dtype=np.float64) * STEP_SPLIT)
    step = step.astype(np.uint64)  # (segment_salt keeps its low 32 bits)
    table.view(np.uint32)[:, N_HYPER] = nx.segment_salt(keys.astype(np.uint64), step)


def launch(plan: KernelPlan, family: str, decoupled: bool, params, grads, hyper_rows,
           maximize=None) -> None:
    """Run one fused step over every segment of ``plan``.

    ``params``/``grads`` are the flat local tensors (one per optimizer tensor, in plan order);
    ``hyper_rows`` is ``[n_tensors, N_HYPER]`` (float64 or float32 numpy; rounded to fp32
    here). Host work per call: the tensors' addresses are compared with the previous call's,
    and the offsets table is rebuilt and copied only when one moved (gradients usually come
    back at the same addresses from the caching allocator); the hyper-parameter rows are copied
    every call.

    Capturable step: ``hyper_rows`` is an fp32 tensor on the device (computed there from the
    step and lr tensors) and ``maximize`` the groups' flag; the rows are copied device to device
    into the plan's preallocated buffer, and nothing is read or staged on the host unless a
    param/grad moved (then the offsets are staged as above; under graph capture from a pinned
    buffer of the graph's own, since the replay re-reads it).
    """
    if plan.n_blocks == 0:
        return
    ptrs = (list(map(_data_ptr, params)), list(map(_data_ptr, grads)))
    restaged = ptrs != plan._ptrs
    if restaged:
        _stage_offsets(plan, ptrs, params, grads)
    if torch.is_tensor(hyper_rows):
        plan._hyper_dev[:, :N_HYPER].copy_(hyper_rows[: plan.n_tensors])
        if plan.stochastic:
            if plan._keys_dev is None:
                plan._keys_dev = torch.from_numpy(plan.tensor_keys.view(np.int32)).to(plan._hyper_dev.device)
            B = 256
            _salt_kernel[(triton.cdiv(plan.n_tensors, B),)](plan._hyper_dev, plan._keys_dev, plan.n_tensors,
                                                             NHYPER=NHYPER_K, B=B)
    else:
        # Wait (normally no wait at all) until the previous step's copies have left the pinned
        # staging buffers before overwriting them (_stage_offsets already waited if it ran);
        # this does not wait for the previous kernel.
        if not restaged and plan._copied is not None:
            plan._copied.synchronize()
        hyper = plan._hyper_host.numpy()
        hyper[:, :N_HYPER] = hyper_rows[: plan.n_tensors]
        if plan.stochastic:
            _write_salts(hyper, plan.tensor_keys, hyper_rows[: plan.n_tensors])
        maximize = bool((hyper[:, _SIGN] != 1.0).any())
        plan._hyper_dev.copy_(plan._hyper_host, non_blocking=True)
        if plan._offs_dev.is_cuda:
            if plan._copied is None:  # one event per plan, re-recorded every step
                plan._copied = torch.cuda.Event()
            plan._copied.record()

    kw = _kernel_kwargs(plan, family, decoupled, params[0].dtype, maximize)
    dummy = params[0]
    n_states = kw["N_STATES"]
    args = (
        plan.blk_seg,
        plan.blk_start,
        plan._offs_dev,
        plan._hyper_dev,
        params[0],
        grads[0],
        plan.rhos[0] if kw["HAS_RHO"] else dummy,
        plan.scales[0][0] if (n_states >= 1 and plan.quantized) else dummy,
        plan.codes[0][0] if n_states >= 1 else dummy,
        plan.scales[1][0] if (n_states >= 2 and plan.quantized) else dummy,
        plan.codes[1][0] if n_states >= 2 else dummy,
    )
    _flash_step_kernel[(plan.n_blocks,)](*args, **kw)


assert len(HYPER_COLUMNS["adam"]) == N_HYPER
assert all(cols[_SIGN] == "sign" for cols in HYPER_COLUMNS.values())
