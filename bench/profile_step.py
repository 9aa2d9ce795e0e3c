"""One FlashAdamW-24 step on a 2.7e8-element bf16 tensor, for `ncu` (diagnostics for tuning)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashoptim_dist as F  # noqa: E402

p = torch.nn.Parameter(torch.randn(16384 * 16384, device="cuda", dtype=torch.bfloat16) * 0.02)
p.grad = torch.randn_like(p) * 1e-3
opt = F.FlashAdamW([p])
for _ in range(3):
    opt.step()
torch.cuda.synchronize()
