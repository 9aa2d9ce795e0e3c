"""Kernel laboratory (diagnostics for tuning; the benchmark of record is bench/step.py).

    python bench/kernel_lab.py            # on a CUDA machine

1. Exhaustive check of the kernel's normal-range division (``_div_normal``, CUDA's ``div.rn``
   fast path without its range check) against ``div_rn`` on the compander's quotient
   254x/(1+|x|) for *every* fp32 x in [0, 1.01], and of the kernel's signed dequantization
   (``prmt`` byte conversion, ``_div_normal``) against y/(2−|y|) with ``div_rn`` for all 256 codes.
   The kernel relies on these being identical; a mismatch count other than 0 is a bug.
2. Times the library's FlashAdamW-24 step on one ~0.97e9-element bf16 tensor against a
   *skeleton* kernel with the same tile, roles and bytes but trivial math (the ceiling of this
   access pattern) and a plain device copy, and prints a table.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashoptim_dist as F  # noqa: E402
from flashoptim_dist.kernels import fused_step as fs  # noqa: E402


@triton.jit
def _skeleton(p_ptr, g_ptr, r_ptr, c0_ptr, s0_ptr, c1_ptr, s1_ptr, NG: tl.constexpr, G: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NG)
    a = pid * (NG * G) + rows[:, None] * G + tl.arange(0, G)[None, :]
    grp = pid * NG + rows
    p = tl.load(p_ptr + a).to(tl.float32)
    g = tl.load(g_ptr + a).to(tl.float32)
    r = tl.load(r_ptr + a)
    c0 = tl.load(c0_ptr + a)
    c1 = tl.load(c1_ptr + a)
    s0 = tl.load(s0_ptr + grp).to(tl.float32)
    s1 = tl.load(s1_ptr + grp).to(tl.float32)
    tl.store(p_ptr + a, (p + g).to(tl.bfloat16))
    tl.store(r_ptr + a, r + 1)
    tl.store(c0_ptr + a, c0 ^ c1.to(tl.int8))
    tl.store(c1_ptr + a, c1 + r.to(tl.uint8))
    tl.store(s0_ptr + grp, (s0 + tl.max(p, axis=1)).to(tl.bfloat16))
    tl.store(s1_ptr + grp, (s1 + 1.0).to(tl.bfloat16))


@triton.jit
def _check_div_kernel(out_ptr, start, n, BLOCK: tl.constexpr):
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < start + n
    xn = offs.to(tl.int32).to(tl.float32, bitcast=True)
    a = xn * 254.0
    b = 1.0 + tl.abs(xn)
    y1 = fs._div_normal(a, b, False)
    y2 = tl.div_rn(a, b)
    c1 = fs._round_int(y1)
    c2 = fs._round_int(y2)
    tl.atomic_add(out_ptr, tl.sum((ok & (y1 != y2)).to(tl.int32)))
    tl.atomic_add(out_ptr + 1, tl.sum((ok & (c1 != c2)).to(tl.int32)))
    q = ((offs & 255) - 128).to(tl.int8)
    n = q.to(tl.float32)
    ok2 = ok & (offs < start + 256)
    d1 = fs._dequant_signed(q, 1.0, False)
    d2 = tl.div_rn(n, 254.0 - tl.abs(n))
    tl.atomic_add(out_ptr + 2, tl.sum((ok2 & (d1 != d2)).to(tl.int32)))


def check_div_normal():
    """(quotient mismatches, code mismatches, dequant mismatches, values checked)."""
    out = torch.zeros(3, dtype=torch.int32, device="cuda")
    hi = int(torch.tensor(1.01).view(torch.int32))
    _check_div_kernel[(triton.cdiv(hi, 4096),)](out, 0, hi, BLOCK=4096)
    return (*out.tolist(), hi)


def timeit(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main(n=973078528):
    ym, cm, dm, count = check_div_normal()
    print(f"_div_normal vs div_rn over every fp32 x in [0, 1.01] ({count} values): quotient mismatches {ym}, "
          f"code mismatches {cm}; dequantization: {dm} of 256 codes", flush=True)
    G = 32
    n = n // (64 * G) * (64 * G)
    dev = "cuda"
    p = (torch.randn(n, device=dev) * 0.02).bfloat16()
    g = (torch.randn(n, device=dev) * 1e-3).bfloat16()
    rows = []
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = F.FlashAdamW([param], lr=1e-4)
    opt.step()
    rows.append((f"library FlashAdamW-24 (NG={fs.GROUPS_PER_BLOCK}, warps={fs.NUM_WARPS})", timeit(opt.step)))
    st = opt.state[param]
    r, c0, c1 = st["rho"], st["exp_avg"], st["exp_avg_sq"]
    s0, s1 = st["exp_avg_scales"], st["exp_avg_sq_scales"]
    for ng, nw in [(32, 4), (64, 8)]:
        grid = (n // (ng * G),)
        rows.append((f"skeleton ng={ng} warps={nw}", timeit(
            lambda: _skeleton[grid](p, g, r, c0, s0, c1, s1, NG=ng, G=G, num_warps=nw))))
    del opt, param
    src = torch.empty(n * 7 // 2, dtype=torch.int16, device=dev)
    dst = torch.empty_like(src)
    rows.append(("device copy of 7 B/element (14 B moved)", timeit(lambda: dst.copy_(src))))
    print(f"\nn = {n / 1e9:.3f}e9 elements on {torch.cuda.get_device_name()}")
    print("| case | ms | TB/s at 12.25 B/element |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {12.25 * n / ms / 1e9:.2f} |")


if __name__ == "__main__":
    main()
