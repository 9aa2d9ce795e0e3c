"""Tiny GPT-like transformer and deterministic data for the DeepSpeed tests (CPU, bf16)."""

from __future__ import annotations

import json
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, HEADS, LAYERS, SEQ = 67, 24, 2, 2, 12


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 3 * d + 1)  # odd sizes: fragments cut groups at odd places
        self.out = nn.Linear(3 * d + 1, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.zeros(SEQ, D))
        self.blocks = nn.ModuleList(Block(D, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


def make_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    m = TinyGPT()
    with torch.no_grad():
        m.pos.normal_(0, 0.02)
    return m.to(torch.bfloat16)


def batch(step: int, micro: int, rank: int, per_rank: int = 4):
    """Sequences for (optimizer step, micro-step, rank): a deterministic function of the three."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randint(0, VOCAB, (per_rank, SEQ + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def run_case_plan(plan, todo, out_path, results):
    """Run the ``(name, fn)`` cases of a multi-rank DeepSpeed test script (``todo`` = the names to
    run, or ``["all"]``). A case that raises is recorded with its traceback instead of stopping the
    others; every rank writes what it has after every case (rank 0 to ``out_path``, others to
    ``out_path.rank<r>``), so a hang or crash later still reports what ran."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for name, fn in plan:
        if todo != ["all"] and name not in todo:
            continue
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
        results.setdefault("seconds", {})[name] = round(time.time() - t0, 2)
        with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
            json.dump(results, f, indent=1, default=str)
        dist.barrier()
    return results
