"""Print an instruction histogram of the compiled FlashAdamW-24 kernel (diagnostics for tuning).

    python bench/kernel_asm.py      # on a CUDA machine
"""

import collections
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashoptim_dist as F  # noqa: E402
from flashoptim_dist.kernels import fused_step  # noqa: E402


def main():
    ps = [torch.nn.Parameter(torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16))]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = F.FlashAdamW(ps)
    opt.step()
    torch.cuda.synchronize()
    cache = fused_step._flash_step_kernel.device_caches
    for dev, entry in cache.items():
        kernels = entry[0]
        for key, k in kernels.items():
            for kind in ("sass", "ptx"):
                asm = k.asm.get(kind)
                if not asm:
                    continue
                ops = collections.Counter()
                for line in asm.splitlines():
                    line = line.strip()
                    if kind == "sass":
                        m = re.match(r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
                    else:
                        m = re.match(r"(@%p\d+\s+)?([a-z]+[a-z0-9_.]*)\s", line)
                    if m:
                        ops[m.group(2).split(".")[0]] += 1
                print(f"{kind}: {sum(ops.values())} instructions; n_regs={getattr(k, 'n_regs', '?')} "
                      f"n_spills={getattr(k, 'n_spills', '?')}")
                print("  ", ops.most_common(40))


if __name__ == "__main__":
    main()
