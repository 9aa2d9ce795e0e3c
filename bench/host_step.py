"""Host (CPU) time of FlashAdamW.step(), for checking that a refactor of the optimizer core
does not slow its Python side down.

    python bench/host_step.py host      # kernel launch stubbed out: the GPU path's host work
    python bench/host_step.py general   # the same, the general path every step (gradient release)
    python bench/host_step.py ref 10    # the CPU reference path, math included (10 steps)

Two models: 200 small Linear(16, 16) layers (400 tensors) and 4 large ones. Prints the median
over 3 runs of the median step time (time.perf_counter around step(), after warm-up). Compare
two trees with PYTHONPATH=<tree> python bench/host_step.py ...
"""

import os
import statistics
import sys
import time

import torch

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashoptim_dist as F  # noqa: E402
from flashoptim_dist.kernels import fused_step  # noqa: E402
from flashoptim_dist.optim import base  # noqa: E402

MODE = sys.argv[1] if len(sys.argv) > 1 else "host"
if MODE not in ("host", "general", "ref"):
    raise SystemExit(__doc__)
if MODE != "ref":  # take the kernel path, with a launch that does nothing
    base._triton_usable = lambda device, backend: True
    fused_step.launch = lambda *a, **k: None


def model(kind):
    torch.manual_seed(0)
    if kind == "small":
        layers = [torch.nn.Linear(16, 16) for _ in range(200)]
    else:
        n = 256 if MODE == "ref" else 1024
        layers = [torch.nn.Linear(n, n) for _ in range(4)]
    m = torch.nn.Sequential(*layers).to(torch.bfloat16)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return m


def run(kind, steps, warm):
    opt = F.FlashAdamW(model(kind).parameters(), lr=1e-3)
    if MODE == "general":
        opt._steady_step = lambda: False
    for _ in range(warm):
        opt.step()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    torch.set_num_threads(1)
    steps, warm = (200, 20) if MODE != "ref" else (int(sys.argv[2]) if len(sys.argv) > 2 else 20, 3)
    for kind in ("small", "large"):
        rs = [run(kind, steps, warm) for _ in range(3)]
        print(f"{MODE} {kind}: median step {1e3 * statistics.median(rs):.4f} ms "
              f"(runs: {', '.join(f'{1e3 * r:.4f}' for r in rs)})", flush=True)


if __name__ == "__main__":
    main()
