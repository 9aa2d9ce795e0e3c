"""Where one training step's GPU time goes (issue 17 item 3), through the trainer's own step.

    python bench/profile_train.py --config configs/one_gpu_8b.yaml [section.key=value ...]

Builds the run exactly as ``flashoptim-dist train`` does (one process, ``engine.name=single``),
trains ``--warmup`` steps, then records ``--steps`` steps with ``torch.profiler`` (CUDA kernels)
and prints the GPU time per kernel class — matmuls, attention, the fused optimizer kernel,
elementwise/norm/loss, copies — with its share of the wall time, then the largest kernels. The
classes come from kernel names (cuBLAS/CUTLASS ``gemm``/``nvjet``/``sm90``, flash-attention,
``_flash_step_kernel``), so a share is as good as that naming; "other" is the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flashoptim_dist.train.config import load_config  # noqa: E402
from flashoptim_dist.train.trainer import Trainer, in_process_group  # noqa: E402

#: (class, regex over the CUDA kernel name), first match wins
CLASSES = (
    ("optimizer (fused Flash step)", r"_flash_step_kernel"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|nvjet|sm90_xmma|sm80_xmma|cutlass|cublas"),
    ("copy / cast", r"copy|memcpy|memset|cast|to_copy|CatArrayBatched"),
    ("reduction (norms, loss, clip)", r"reduce|norm|softmax|cross_entropy|nll|log_softmax|sum_kernel"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_"),
)


def classify(name: str) -> str:
    for cls, pat in CLASSES:
        if re.search(pat, name, re.IGNORECASE):
            return cls
    return "other"


def run(cfg, warmup: int, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer = Trainer(cfg)
    dev = trainer.device
    for s in range(warmup):
        trainer.train_step(s)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for s in range(warmup, warmup + steps):
            trainer.train_step(s)
        torch.cuda.synchronize(dev)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    per_class: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            per_class[classify(ev.name)] += us / 1e3 / steps
            per_kernel[ev.name] += us / 1e3 / steps
    gpu_ms = sum(per_class.values())
    tokens = trainer.tokens_per_step
    print(f"\n{steps} profiled steps after {warmup} warm-up: {wall_ms:.1f} ms wall per step "
          f"(profiler on), {tokens / wall_ms * 1e3:,.0f} tokens/s; kernels {gpu_ms:.1f} ms per step "
          f"({100 * gpu_ms / wall_ms:.0f}% of the wall time; the rest is the GPU idle)")
    print("\n| kernel class | ms per step | % of wall |\n|---|---:|---:|")
    for cls, ms in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"| {cls} | {ms:.1f} | {100 * ms / wall_ms:.1f} |")
    idle = max(wall_ms - gpu_ms, 0.0)
    print(f"| idle (wall − kernels) | {idle:.1f} | {100 * idle / wall_ms:.1f} |")
    print(f"\n| top {top} kernels | class | ms per step |\n|---|---|---:|")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {name[:90]} | {classify(name)} | {ms:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/profile_train.py needs a CUDA device")
    over = ["train.progress=false", "train.resume=false", "train.ckpt_every=0", *args.overrides]
    cfg = load_config(args.config, over)
    in_process_group(lambda c: run(c, args.warmup, args.steps, args.top), cfg)


if __name__ == "__main__":
    main()
