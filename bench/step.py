"""Optimizer-step benchmark on one GPU (issue 2): Flash optimizers vs torch AdamW.

    python bench/step.py            # ~0.97e9 params in Llama-like shapes + 10k small tensors
    python bench/step.py --tiny     # seconds, for a smoke test
    python bench/step.py --capture  # + host time of an eager step, and opt.step() captured in a
                                    #   CUDA graph (capturable=True): replay GPU and host time

Prints persistent bytes/param, the GPU time per step (CUDA events around 20 steps queued back to
back, after warm-up; also the median of single steps timed from an idle GPU), effective
bandwidth (bytes the step must move / GPU time) and its share of a measured device-to-device copy.
Also checks the fused kernel against the reference math on the GPU (mismatch counts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashoptim_dist as F  # noqa: E402
from flashoptim_dist import numerics as nx  # noqa: E402
from flashoptim_dist.kernels import _jit  # noqa: E402

# bytes read + written per element by one step (params, ρ, grads, states; scales: 4 B / 32 el / state)
TRAFFIC = {
    "FlashAdamW-24": 2 + 1 + 2 + 1 + 1 + 2 + 1 + 1 + 1 + 2 * 4 / 32,
    "FlashAdamW-24-nearest": 2 + 1 + 2 + 1 + 1 + 2 + 1 + 1 + 1 + 2 * 4 / 32,
    "FlashAdamW-32": 2 + 2 + 2 + 1 + 1 + 2 + 2 + 1 + 1 + 2 * 4 / 32,
    "FlashSGD-mom": 2 + 1 + 2 + 1 + 2 + 1 + 1 + 4 / 32,
    "FlashLion": 2 + 1 + 2 + 1 + 2 + 1 + 1 + 4 / 32,
    "torch-AdamW-fused-fp32": 4 + 4 + 4 + 4 + 4 + 4 + 4,
    "torch-AdamW-foreach-fp32": 4 + 4 + 4 + 4 + 4 + 4 + 4,
}


def llama_shapes(layers=4, d=4096, ff=14336):
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ff, d)] * 2 + [(d, ff)] + [(d,)] * 2
    return shapes


def small_shapes(n=10_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1024, 65536 + 1, (n,), generator=g).tolist()
    return [(s,) for s in sizes]


def copy_bandwidth(nbytes=2 << 30):
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times)


def make(name, shapes, capturable=False):
    flash = name.startswith("Flash")
    dtype = torch.bfloat16 if flash else torch.float32
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if capturable:  # lr as a device tensor, as a scheduler would update it between replays
        if not flash:
            return params, torch.optim.AdamW(params, lr=torch.tensor(1e-4, device="cuda"), capturable=True,
                                             fused=name.endswith("fused-fp32"), foreach=name.endswith("foreach-fp32"))
        kw = dict(capturable=True)
        lr = {"FlashSGD-mom": 1e-3, "FlashLion": 1e-5}.get(name, 1e-4)
        cls = {"FlashSGD-mom": F.FlashSGD, "FlashLion": F.FlashLion}.get(name, F.FlashAdamW)
        kw.update({"FlashAdamW-24-nearest": dict(rounding="nearest"), "FlashAdamW-32": dict(master_weight_bits=32),
                   "FlashSGD-mom": dict(momentum=0.9)}.get(name, {}))
        return params, cls(params, lr=torch.tensor(lr, dtype=torch.float64, device="cuda"), **kw)
    if name == "FlashAdamW-24":
        opt = F.FlashAdamW(params, lr=1e-4)
    elif name == "FlashAdamW-24-nearest":  # round-to-nearest codes and ρ (the pre-0.2 numerics)
        opt = F.FlashAdamW(params, lr=1e-4, rounding="nearest")
    elif name == "FlashAdamW-32":
        opt = F.FlashAdamW(params, lr=1e-4, master_weight_bits=32)
    elif name == "FlashSGD-mom":
        opt = F.FlashSGD(params, lr=1e-3, momentum=0.9)
    elif name == "FlashLion":
        opt = F.FlashLion(params, lr=1e-5)
    elif name == "torch-AdamW-fused-fp32":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif name == "torch-AdamW-foreach-fp32":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    else:
        raise ValueError(name)
    return params, opt


def time_step(opt, warmup=3, reps=10):
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        opt.step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_pipelined(opt, warmup=3, steps=20):
    """GPU time per step with the steps queued back to back (one event pair around ``steps``
    calls): the host prepares step i+1 while the GPU runs step i, as in training, where the
    host works ahead during the backward pass. :func:`time_step` starts each step on an idle
    GPU, so it also counts the host's latency to its first launch (~0.3 ms here)."""
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(steps):
        opt.step()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / steps


def host_time(opt, reps=10):
    """Median host time of one eager ``opt.step()`` call (until it returns, GPU not waited for)."""
    import time

    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(times)


def time_capture(opt, reps=10):
    """``opt.step()`` (capturable) captured in a CUDA graph after an eager warm-up on a side
    stream: median GPU time per replay (events, ms) and host time per ``replay()`` call (µs)."""
    import time

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        t0 = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t0)
        b.record()
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b))
    del graph
    return statistics.median(gpu), 1e6 * statistics.median(host)


def persistent_bytes(params, opt):
    n = sum(p.numel() for p in params)
    b = sum(p.numel() * p.element_size() for p in params)
    b += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                b += v.numel() * v.element_size()
    return b / n


@triton.jit
def _helpers_probe(v_ptr, s_ptr, out_v, out_s, N: tl.constexpr, M: tl.constexpr, B: tl.constexpr,
                   INTERPRET: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    v = tl.load(v_ptr + i, mask=i < N, other=0.0)
    tl.store(out_v + i, _jit._sqrt_v(v, True, INTERPRET), mask=i < N)
    sb = tl.load(s_ptr + i, mask=i < M, other=0)
    tl.store(out_s + i, _jit._reciprocal_rz(sb, 255.0, INTERPRET), mask=i < M)


@triton.jit
def _decode_probe(q_ptr, s_ptr, out_m, out_v, N: tl.constexpr, B: tl.constexpr, INV_UNSIGNED: tl.constexpr,
                  INTERPRET: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    q = tl.load(q_ptr + i, mask=i < N, other=0)
    s = tl.load(s_ptr + i // 256, mask=i < N, other=0.0).to(tl.float32)
    tl.store(out_m + i, _jit._dequant_signed(q.to(tl.int8), s, INTERPRET), mask=i < N)
    tl.store(out_v + i, _jit._dequant_sqrt(q.to(tl.uint8), s, INV_UNSIGNED, INTERPRET), mask=i < N)


def check_decoders_on_gpu(device="cuda"):
    """Both decoders against numerics for every code (all 256 bytes) under every positive bf16
    scale up to 2^64 (the largest √v scale): the signed one's short division and the √v one's
    single FMA. Returns mismatch counts (0 expected)."""
    scales = (torch.arange(0x0001, 0x5F81, dtype=torch.int32) << 16).view(torch.float32).bfloat16()
    codes = torch.arange(256, dtype=torch.int32).repeat(scales.numel())
    out_m = torch.empty(codes.numel(), device=device)
    out_v = torch.empty_like(out_m)
    B = 1024
    _decode_probe[(triton.cdiv(codes.numel(), B),)](
        codes.to(device), scales.to(device), out_m, out_v, N=codes.numel(), B=B, INV_UNSIGNED=nx.INV_UNSIGNED,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1")
    want_m = nx.dequantize_signed(codes.to(torch.uint8).view(torch.int8), scales, group_size=256).to(device)
    want_v = nx.dequantize_sqrt(codes.to(torch.uint8), scales, group_size=256).to(device)
    return {"decode_signed_mismatches": int((out_m.view(torch.int32) != want_m.view(torch.int32)).sum()),
            "decode_sqrt_mismatches": int((out_v.view(torch.int32) != want_v.view(torch.int32)).sum()),
            "decode_cases": int(codes.numel())}


def check_helpers_on_gpu(n=1 << 26, device="cuda"):
    """The kernel's fast-path square root against correctly rounded √v (numerics.sqrt_v) on every
    range of v — ``n`` random finite non-negative patterns plus the ends of the fast path — and
    its 255/s rounded toward zero against numerics on every positive finite bf16 scale.
    Returns mismatch counts (0 expected)."""
    g = torch.Generator(device=device).manual_seed(0)
    bits = torch.randint(0, 0x7F800000, (n,), device=device, generator=g, dtype=torch.int64)
    edges = torch.arange(-4096, 4096, device=device, dtype=torch.int64)
    bits = torch.cat([bits, 0x0D000000 + edges, 0x7F7FFFFF - 4096 + edges.abs(), edges.abs(),
                      torch.tensor([0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0x80000000], device=device)])
    v = bits.to(torch.int32).view(torch.float32)
    sb = torch.arange(0x0001, 0x7F80, device=device, dtype=torch.int32) << 16  # every positive finite bf16
    out_v, out_s = torch.empty_like(v), torch.empty(sb.numel(), device=device)
    B = 1024
    _helpers_probe[(triton.cdiv(max(v.numel(), sb.numel()), B),)](
        v, sb, out_v, out_s, N=v.numel(), M=sb.numel(), B=B, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1")
    want_v = nx.sqrt_v(v.cpu()).to(device)
    want_s = nx._reciprocal(sb.cpu().view(torch.float32), 255.0, toward_zero=True).to(device)
    same = (out_v.view(torch.int32) == want_v.view(torch.int32)) | (torch.isnan(out_v) & torch.isnan(want_v))
    return {"sqrt_v_mismatches": int((~same).sum()), "sqrt_v_cases": int(v.numel()),
            "reciprocal_rz_mismatches": int((out_s.view(torch.int32) != want_s.view(torch.int32)).sum()),
            "reciprocal_rz_cases": int(sb.numel())}


def check_kernel_vs_reference():
    """Same random problem through the kernel and through the reference on the GPU and CPU."""
    out = {}
    for name, cls, kw in [("adamw24", F.FlashAdamW, {}), ("adamw32", F.FlashAdamW, {"master_weight_bits": 32}),
                          ("adamw24_nearest", F.FlashAdamW, {"rounding": "nearest"}),
                          ("sgd", F.FlashSGD, {"momentum": 0.9, "nesterov": True}), ("lion", F.FlashLion, {})]:
        res = {}
        for backend, dev in (("triton", "cuda"), ("reference", "cuda"), ("reference", "cpu")):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter((torch.randn(n) * 0.1).bfloat16().to(dev)) for n in (1, 77, 4096, 100003)]
            # edge values: zeros, subnormals, huge, powers of two; a NaN and an inf gradient below
            edge = torch.tensor([0.0, -0.0, 1e-40, -1e-39, 3.3e38, -3.3e38, 1.0, -0.5, 2.0 ** -100, 65504.0] * 7)
            ps.append(torch.nn.Parameter(edge.bfloat16().to(dev)))
            opt = cls(ps, lr=1e-3, backend=backend, **kw)
            for s in range(3):
                g = torch.Generator().manual_seed(s)
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g).bfloat16().to(dev)
                ps[-1].grad[3 + s] = float("nan")
                ps[-1].grad[40 + s] = float("inf")
                ps[-1].grad[50:60] *= 1e-20  # v below 2^-101: √v's fast path does not apply
                ps[-1].grad[60:64] *= 1e18  # g² overflows: v = inf
                opt.step()
            flat = [p.detach().cpu().view(torch.int16) for p in ps]
            for p in ps:
                for k, v in opt.state[p].items():
                    if torch.is_tensor(v):
                        flat.append(v.cpu().view(torch.int16) if v.dtype == torch.bfloat16 else v.cpu())
            res[(backend, dev)] = flat
        k, r, c = res[("triton", "cuda")], res[("reference", "cuda")], res[("reference", "cpu")]
        out[name] = {
            "kernel_vs_ref_cuda_mismatches": int(sum((a != b).sum() for a, b in zip(k, r))),
            "kernel_vs_ref_cpu_mismatches": int(sum((a != b).sum() for a, b in zip(k, c))),
        }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time one optimizer over block/warp configs first")
    ap.add_argument("--sweep-optimizer", default="FlashAdamW-24",
                    choices=("FlashAdamW-24", "FlashAdamW-24-nearest", "FlashAdamW-32", "FlashSGD-mom", "FlashLion"),
                    help="the optimizer --sweep times (default FlashAdamW-24)")
    ap.add_argument("--capture", action="store_true",
                    help="per case also: host time of an eager step, and capturable=True captured in a CUDA graph "
                         "(GPU time and host time per replay)")
    ap.add_argument("--sweep-configs", nargs="+", default=None, metavar="CAP,GROUPS,WARPS[,PREFETCH]",
                    help="with --sweep: the (register cap, groups per block, warps, L2 prefetch distance in blocks) "
                         "to time, e.g. 64,32,4 48,32,4,512 (cap 0 = none; knobs left out keep "
                         "their defaults); default: the five of the AdamW sweep")
    ap.add_argument("--sweep-only", action="store_true", help="with --sweep: stop after the sweep (and torch fused "
                    "AdamW on the same shapes, the baseline of the same run)")
    args = ap.parse_args()
    if (args.sweep_only or args.sweep_configs) and not args.sweep:
        ap.error("--sweep-only and --sweep-configs belong to the sweep: give --sweep too")
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(256 << 20 if args.tiny else 2 << 30)
    print(f"device: {dev}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    check = check_kernel_vs_reference()
    print("kernel vs reference:", json.dumps(check), flush=True)
    check["helpers"] = check_helpers_on_gpu(1 << 20 if args.tiny else 1 << 26)
    print("kernel helpers vs numerics:", json.dumps(check["helpers"]), flush=True)
    check["decoders"] = check_decoders_on_gpu()
    print("kernel decoders vs numerics:", json.dumps(check["decoders"]), flush=True)
    if args.sweep:
        from flashoptim_dist.kernels import fused_step

        shapes = llama_shapes(1 if args.tiny else 4, 1024 if args.tiny else 4096, 3584 if args.tiny else 14336)
        knobs = ("MAXNREG", "GROUPS_PER_BLOCK", "NUM_WARPS", "PREFETCH", "PF_EVERY")
        defaults = tuple(getattr(fused_step, k) for k in knobs)
        # (register cap, groups per program, warps): 32 x 4 = 8 elements per thread (64 registers
        # spill 48 bytes, 72 spill 16, uncapped 78 none); 64 x 4 and 32 x 2 = 16 (the per-program
        # set-up spread over twice the elements; 126 registers without spills since the bf16 bit
        # split of ρ, bench/kernel_sass.py)
        configs = [c + defaults[3:] for c in [(64, 32, 4), (72, 32, 4), (0, 32, 4), (128, 64, 4), (128, 32, 2)]]
        if args.sweep_configs:
            configs = [tuple(int(x) for x in c.split(",")) for c in args.sweep_configs]
            configs = [c + defaults[len(c):] for c in configs]  # knobs left out keep their defaults
            # (MAXNREG 0 = uncapped; None would mean each family's own cap)
        for rnd in range(2):  # two interleaved rounds: machine drift shows as round-to-round change
            for cfg in configs:
                for k, v in zip(knobs, cfg):
                    setattr(fused_step, k, v)
                params, opt = make(args.sweep_optimizer, shapes)
                ms = time_pipelined(opt, warmup=2, steps=10)
                knob_text = " ".join(f"{k.lower()}={v}" for k, v in zip(knobs, cfg))
                print(f"sweep {args.sweep_optimizer} round {rnd} {knob_text}: {ms:.2f} ms", flush=True)
                del params, opt
                torch.cuda.empty_cache()
        for k, v in zip(knobs, defaults):
            setattr(fused_step, k, v)
        fused_step.EXACT = False  # what bit-exactness costs (not a mode the optimizer offers)
        params, opt = make(args.sweep_optimizer, shapes)
        print(f"{args.sweep_optimizer} inexact (approx div/sqrt + FMA) at the defaults {defaults}: "
              f"{time_pipelined(opt, warmup=2, steps=10):.2f} ms", flush=True)
        del params, opt
        torch.cuda.empty_cache()
        fused_step.EXACT = True
        if args.sweep_only:
            params, opt = make("torch-AdamW-fused-fp32", shapes)
            print(f"torch AdamW fused fp32, same shapes: {time_pipelined(opt, warmup=2, steps=10):.2f} ms", flush=True)
            return
    cases = [
        ("llama", llama_shapes(1 if args.tiny else 4, 1024 if args.tiny else 4096, 3584 if args.tiny else 14336),
         ["FlashAdamW-24", "FlashAdamW-24-nearest", "FlashAdamW-32", "FlashSGD-mom", "FlashLion",
          "torch-AdamW-fused-fp32"]),
        ("small", small_shapes(500 if args.tiny else 10_000),
         ["FlashAdamW-24", "torch-AdamW-fused-fp32", "torch-AdamW-foreach-fp32"]),
    ]
    for case, shapes, names in cases:
        for name in names:
            params, opt = make(name, shapes)
            n = sum(p.numel() for p in params)
            ms = time_step(opt)
            gpu_ms = time_pipelined(opt)
            pb = persistent_bytes(params, opt)
            gbs = TRAFFIC[name] * n / (gpu_ms / 1e3)
            rows.append(dict(case=case, optimizer=name, params=n, tensors=len(shapes), ms=ms, gpu_ms=gpu_ms,
                             bytes_per_param=pb, eff_TBps=gbs / 1e12, share_of_copy=gbs / bw,
                             share_of_copy_from_idle=TRAFFIC[name] * n / (ms / 1e3) / bw))
            if args.capture:
                rows[-1]["host_ms"] = host_time(opt)
                del params, opt
                torch.cuda.empty_cache()
                params, opt = make(name, shapes, capturable=True)
                rows[-1]["capturable_ms"] = time_step(opt)
                rows[-1]["replay_ms"], rows[-1]["replay_host_us"] = time_capture(opt)
            print(json.dumps(rows[-1]), flush=True)
            del params, opt
            torch.cuda.empty_cache()
    print("\n(GPU ms/step: steps queued back to back; from idle: one step timed from an idle GPU, which adds "
          "the host's latency to the first launch. Effective TB/s and % of copy use the GPU ms/step.)")
    print("| case | optimizer | params | tensors | GPU ms/step | from idle | persistent B/param | eff. TB/s | "
          "% of copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['optimizer']} | {r['params'] / 1e9:.3f}e9 | {r['tensors']} | {r['gpu_ms']:.2f} | "
              f"{r['ms']:.2f} | {r['bytes_per_param']:.2f} | {r['eff_TBps']:.2f} | {100 * r['share_of_copy']:.0f}% |")
    if args.capture:  # kernel (event) time, host time and captured-replay time per case
        print("\n| case | optimizer | step ms | host ms (eager) | capturable eager ms | replay ms | host µs/replay |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['optimizer']} | {r['ms']:.2f} | {r['host_ms']:.2f} | {r['capturable_ms']:.2f} | "
                  f"{r['replay_ms']:.2f} | {r['replay_host_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "copy_TBps": bw / 1e12, "check": check, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
