"""Host-time breakdown of one FlashAdamW step on a 1-rank FSDP2 GPT (195 params), GPU host."""
import os, sys, time, statistics
import torch, torch.distributed as dist
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import flashoptim_dist as fo
from flashoptim_dist.kernels import fused_step as fs
from flashoptim_dist.models.gpt import GPT, GPTConfig
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29555", RANK="0", WORLD_SIZE="1")
dist.init_process_group("nccl")
torch.cuda.set_device(0)
D = int(os.environ.get("D", 512))
cfg = GPTConfig(vocab_size=32000, d_model=D, n_layers=24, n_heads=16, mlp="gelu", max_seq_len=128)
with torch.device("meta"):
    m = GPT(cfg)
m = m.to(torch.bfloat16)
mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
for b in m.blocks: fully_shard(b, mp_policy=mp)
fully_shard(m, mp_policy=mp)
m.to_empty(device="cuda"); m.init_weights()
opt = fo.FlashAdamW(m.parameters(), lr=1e-4)
x = torch.randint(0, 32000, (2, 128), device="cuda")
m(x).float().mean().backward()
T = {}
def wrap(obj, name, key):
    f = getattr(obj, name)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T.setdefault(key, []).append(time.perf_counter() - t); return r
    setattr(obj, name, w)
wrap(opt, "_launch", "_launch")
wrap(opt, "_hyper_table", "_hyper_table")
wrap(fs, "launch", "fused_step.launch")
kern = fs._flash_step_kernel
class K:
    def __getitem__(self, grid):
        f = kern[grid]
        def w(*a, **k):
            t = time.perf_counter(); r = f(*a, **k); T.setdefault("triton launch", []).append(time.perf_counter() - t); return r
        return w
fs._flash_step_kernel = K()
for _ in range(3): opt.step()
torch.cuda.synchronize(); T.clear()
import gc
for mode in ("bwd", "bwd+gc_off", "nobwd"):
    T.clear()
    tot = []
    if mode == "bwd+gc_off":
        gc.disable()
    for _ in range(12):
        if mode != "nobwd":
            opt.zero_grad(set_to_none=True)
            m(x).float().mean().backward()
        torch.cuda.synchronize()
        t = time.perf_counter(); opt.step(); tot.append(time.perf_counter() - t)
    gc.enable()
    print(mode, "params", len(list(m.parameters())), "step host ms median", f"{statistics.median(tot) * 1e3:.3f}",
          " ".join(f"{k}={statistics.median(v) * 1e3:.3f}" for k, v in T.items()))
dist.destroy_process_group()
