"""Compile the fused step kernel for Hopper (sm_90) without a GPU and print what it became.

    python bench/kernel_sass.py [--groups 32] [--warps 4] [--maxnreg 0] [--family adam] [--prefetch N] [--dump DIR]

Uses the installed Triton's bundled ptxas/cuobjdump, so kernel changes can be judged on a CPU
machine before spending device time: registers and stack (spills) per thread, SASS
instructions (whole kernel and the aligned fast path up to its first EXIT, per element),
layout conversions left in the TTGIR (each one is a shared-memory round trip) and an opcode
histogram. Pointer arguments are declared 16-byte aligned, as the JIT specializes them at run
time; without that Triton does not vectorize and the numbers mean nothing.

The GPU image runs a different Triton (3.6 in 2026-11) than this machine may have: for numbers
that match the device, compile with that version (``pip install triton==3.6.0`` in a scratch
venv). Timings still need the GPU (bench/step.py, bench/kernel_lab.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/kernel_sass.py compiles the kernel: unset TRITON_INTERPRET (the interpreter has no SASS)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashoptim_dist import numerics as nx  # noqa: E402
from flashoptim_dist.kernels import fused_step as fs  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FAMILY = {"adam": (0, 2), "sgd": (1, 1), "lion": (2, 1)}


def compile_kernel(groups: int, warps: int, maxnreg: int, family: str, rounding: str = "stochastic",
                   prefetch: int = fs.PREFETCH):
    fam, n_states = FAMILY[family]
    signature = dict(blk_seg_ptr="*i32", blk_start_ptr="*i32", offs_ptr="*i64", hyper_ptr="*fp32",
                     p_base="*bf16", g_base="*bf16", r_base="*i8", s0_base="*bf16", c0_base="*i8",
                     s1_base="*bf16", c1_base="*u8")
    constexprs = dict(FAMILY=fam, DECOUPLED=True, NARROW=1, HAS_RHO=True, RHO_N=127,
                      RHO_DEC=fs._rho_constants(127, 7)[0], INV_UNSIGNED=nx.INV_UNSIGNED, N_STATES=n_states,
                      QUANT=True, EMIN=fs._NARROW[torch.bfloat16][1], MANT=7, RHO_ENC=fs._rho_constants(127, 7)[1],
                      NCOLS=fs._NCOLS, NHYPER=fs.N_HYPER, NG=groups, G=32, MASK_SPLIT=min(fs.MASK_SPLIT, groups),
                      EXACT=True, INTERPRET=False, MAXIMIZE=False, SR=rounding == "stochastic",
                      PREFETCH=prefetch, PF_EVERY=fs.PF_EVERY)
    names = list(signature)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)}
    src = ASTSource(fn=fs._flash_step_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": warps, "enable_fp_fusion": False}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def fast_path(lines: list[str]) -> collections.Counter:
    """Opcodes *executed* on the aligned fast path, in program order from the entry to the first
    EXIT: an unconditional branch is followed, ``@!P`` branches (the in-range tests that skip
    the slow paths of ``div.rn``/``sqrt.rn``, taken on normal operands) are taken, ``@P``
    branches (to the masked edge path) are not. Unlike the static count up to the first EXIT,
    this leaves out the slow-path calls that sit inline and never run on normal data."""
    parsed, where = [], {}
    for ln in lines:
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);", ln)
        if m:
            where[int(m.group(1), 16)] = len(parsed)
            parsed.append((m.group(2), m.group(3), m.group(4)))
    ops, pc = collections.Counter(), 0
    while pc < len(parsed):
        pred, op, args = parsed[pc]
        ops[op.split(".")[0]] += 1
        if op.startswith("EXIT"):
            break
        if op.startswith("BRA") and (pred is None or pred.strip().startswith("@!")):
            pc = where[int(args.split()[0].rstrip(","), 16)]
            continue
        pc += 1
    return ops


def _disassemble(k):
    """(SASS text, resource usage text) of a compiled kernel, from the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin],
                             capture_output=True, text=True).stdout
    return sass, res


def _sass_lines(sass: str) -> list[str]:
    return [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=fs.GROUPS_PER_BLOCK)
    ap.add_argument("--warps", type=int, default=fs.NUM_WARPS)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap (0: none); default: the family's")
    ap.add_argument("--family", choices=sorted(FAMILY), default="adam")
    ap.add_argument("--rounding", choices=("stochastic", "nearest"), default="stochastic")
    ap.add_argument("--dump", default=None, help="write kernel.sass and kernel.ttgir here")
    ap.add_argument("--prefetch", type=int, default=fs.PREFETCH, help="L2 prefetch distance in blocks (0: none)")
    a = ap.parse_args(argv)
    if a.maxnreg is None:
        a.maxnreg = fs._maxnreg(a.family) or 0
    k = compile_kernel(a.groups, a.warps, a.maxnreg, a.family, a.rounding, a.prefetch)
    sass, res = _disassemble(k)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res)
    lines = _sass_lines(sass)
    ops = collections.Counter()
    fast = None
    for i, ln in enumerate(lines):
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if op:
            ops[op.group(2).split(".")[0]] += 1
            if fast is None and op.group(2).startswith("EXIT"):
                fast = i + 1
    ttgir = k.asm["ttgir"]
    per_thread = a.groups * 32 // (a.warps * 32)
    print(f"triton {triton.__version__}, sm_90, {a.family}, {a.rounding} rounding: {a.groups} groups x {a.warps} warps "
          f"({per_thread} elements/thread), maxnreg {a.maxnreg or 'none'}")
    if m:
        print(f"registers/thread {m.group(1)}, stack bytes {m.group(2)} (non-zero: spills)")
    print(f"SASS instructions: {sum(ops.values())} in all; {fast} up to the first EXIT "
          f"(aligned fast path, ~{fast / per_thread:.0f} per element)" if fast else "")
    n_exec = sum(fast_path(lines).values())
    if a.prefetch:
        # the path followed above includes the L2 prefetch, which only one program in PF_EVERY
        # issues: count the path without it from the same kernel compiled without the prefetch
        n_pf = ops["UBLKPF"]
        base = compile_kernel(a.groups, a.warps, a.maxnreg, a.family, a.rounding, 0)
        n_base = sum(fast_path(_sass_lines(_disassemble(base)[0])).values())
        print(f"L2 prefetch: {n_pf} bulk prefetches; the program that issues them (one in {fs.PF_EVERY}) runs "
              f"{n_exec - n_base} more instructions per thread, ~{(n_exec - n_base) / fs.PF_EVERY / per_thread:.2f} "
              f"per element on average")
        n_exec = n_base
    print(f"executed on the aligned fast path (slow paths not taken, L2 prefetch not issued): {n_exec}, "
          f"~{n_exec / per_thread:.1f} per element")
    print(f"layout conversions in TTGIR: {ttgir.count('convert_layout')}")
    print("opcodes:", ", ".join(f"{o} {n}" for o, n in ops.most_common(24)))
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        with open(os.path.join(a.dump, "kernel.sass"), "w") as f:
            f.write(sass)
        with open(os.path.join(a.dump, "kernel.ttgir"), "w") as f:
            f.write(ttgir)


if __name__ == "__main__":
    main()
