"""Shared pieces of the checkpoint tests: a model whose shards never cut a quantization group
under FSDP2 on 1-4 ranks nor FSDP1 on 2 ranks (so steps can be compared bit for bit), engines,
deterministic full gradients, and an independent reader of checkpoints (plain DCP
``dcp_to_torch_save``, not our loader).

Sizes: every 2-D weight has a row length that is a multiple of G = 32 (dim-0 shards cut no
group); every 1-D parameter has 384 = 32 · 12 elements, so FSDP2's chunks on 1, 2, 3, 4 ranks
(384, 192, 128, 96) are whole groups; every numel is a multiple of 64 so FSDP1's 2-rank split
falls on a group boundary. ``bias2`` has 2 rows, so FSDP2 on 3 and 4 ranks gives some ranks an
empty shard of it.
"""

from __future__ import annotations

import os
import tempfile
import zlib

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, H = 48, 64, 384
STEPS_BEFORE = 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Linear(D, H)  # weight [384, 64], bias [384]
        self.norm = nn.LayerNorm(H)  # [384], [384]
        self.w_out = nn.Linear(H, D, bias=False)  # [64, 384]

    def forward(self, x):
        return x + self.w_out(F.gelu(self.norm(self.w_in(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)  # [48, 64]
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, VOCAB, bias=False)  # [48, 64]
        self.bias2 = nn.Parameter(torch.zeros(2, D))  # 2 rows: FSDP2 on 3-4 ranks leaves ranks with an empty shard
        self.register_buffer("seen", torch.zeros(4))  # persistent buffer, changes while training

    def forward(self, idx):
        x = self.emb(idx) + self.bias2.sum(0)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(torch.bfloat16)


def batch(step: int, n: int = 4, t: int = 8):
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randint(0, VOCAB, (n, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def clean(name: str) -> str:
    return ".".join(p for p in name.split(".")
                    if p not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"))


# ------------------------------------------------------------------------------------ engines


def wrap(engine: str, model: nn.Module, world: int):
    """Return (wrapped, module) for engine in single | ddp | fsdp2 | fsdp1."""
    import flashoptim_dist.distributed  # noqa: F401  (registers the adapters)

    if engine == "single":
        return model, model
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from flashoptim_dist.distributed import prepare_fsdp1

        w = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))
        prepare_fsdp1(w)
        return w, w
    raise ValueError(engine)


def make_opt(module, lr=1e-2, **kw):
    import flashoptim_dist as fo

    return fo.FlashAdamW(module.parameters(), lr=lr, weight_decay=0.1, **kw)


def fresh(seed: int = 0):
    """A new model and a FlashAdamW over *its* parameters (a load target; an optimizer built for
    another model instance is refused by save/load)."""
    model = make_net(seed)
    return model, make_opt(model)


def make_sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def full_grad(fqn: str, shape, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(fqn.encode()) * 131 + step)
    mag = torch.exp(2.0 * torch.randn(shape, generator=g))
    return (torch.randn(shape, generator=g) * mag * 1e-2).to(torch.bfloat16)


def set_grads(module: nn.Module, step: int) -> None:
    """Give every parameter its slice of a deterministic full gradient (same on any engine)."""
    from flashoptim_dist import layout as lay

    for name, p in module.named_parameters():
        spec = lay.resolve_shard(p)
        local = spec.local(p) if spec.local is not None else p
        full = full_grad(clean(name), spec.global_shape, step).reshape(-1)
        lg = torch.zeros(local.numel(), dtype=local.dtype)
        for s in spec.segments:
            lg[s.local_start : s.local_start + s.length] = full[s.global_start : s.global_start + s.length]
        if type(p).__name__ == "DTensor":
            from torch.distributed.tensor import DTensor

            p.grad = DTensor.from_local(lg.view(local.shape), p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
        else:
            p.grad = lg.view(p.shape)


def train_steps(module, opt, sched, steps):
    for t in steps:
        set_grads(module, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            module.seen += 1


def real_step(wrapped, opt, step: int) -> float:
    """One forward/backward/step on real data: training continues after a load."""
    x, y = batch(step)
    logits = wrapped(x)
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# --------------------------------------------------------------------------- canonical reader


def read_checkpoint(path: str) -> dict:
    """Every entry of a DCP checkpoint as full tensors, read by plain DCP (independent oracle)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "x.pt")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(path, out)
        return torch.load(out, weights_only=False)


def _flatten(sd, prefix=""):
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict) and not k.startswith("rng") and not k.startswith("extra"):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def canonical_tensors(path: str) -> dict:
    sd = _flatten(read_checkpoint(path))
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and (k.startswith("model.") or k.startswith("flash."))}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def diff_canonical(a: dict, b: dict) -> list:
    """Keys whose tensors differ in any bit (or exist on one side only)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(bits(a[k]), bits(b[k])):
            bad.append(k)
    return bad


def check_local_state_equals(canon: dict, module, opt, G: int = 32) -> int:
    # ``module``/``opt``: what was passed to load (a DeepSpeed engine and its optimizer work too)
    """Every local state element (param, ρ, codes, scales) of every optimizer tensor equals the
    canonical value at its global position. Returns the number of elements compared."""
    from flashoptim_dist.checkpoint._views import build_view

    view = build_view(module, opt)
    n = 0
    for ti in view.tensors:
        st = view.client.state[ti.tensor]
        for si in ti.segs:
            ls, L, gs = si.seg.local_start, si.seg.length, si.seg.global_start
            sl = slice(ls, ls + L)
            pairs = [(ti.local[sl], canon["model." + si.fqn].reshape(-1)[gs : gs + L], "param")]
            if "rho" in st:
                pairs.append((st["rho"][sl], canon[f"flash.{si.fqn}.rho"].reshape(-1)[gs : gs + L], "rho"))
            for name in ("exp_avg", "exp_avg_sq"):
                pairs.append((st[name][sl], canon[f"flash.{si.fqn}.{name}"].reshape(-1)[gs : gs + L], name))
                ng = si.seg.n_groups(G)
                pairs.append((st[name + "_scales"][si.soff : si.soff + ng],
                              canon[f"flash.{si.fqn}.{name}.scales"].reshape(-1)[gs // G : gs // G + ng],
                              name + " scales"))
            for got, want, what in pairs:
                if not torch.equal(bits(got), bits(want)):
                    raise AssertionError(f"{si.fqn} {what} [{gs}, {gs + L}) differs from the checkpoint")
                n += got.numel()
    return n


def linear_rho(param: torch.Tensor, master: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """ρ in the linear form that format versions ≤ 2 wrote for a bf16 ``param`` (int8 for
    ``levels`` = 127, int16 for 32767): round((θ − θ')/(u/2)·N) with u the bf16 ULP of θ'
    (exponent floored at −100) — what an old writer would have stored for the master ``master``."""
    pf = param.reshape(-1).double()
    e = torch.floor(torch.log2(torch.where(pf != 0, pf.abs(), 1.0)))
    e = torch.where(pf != 0, e, torch.full_like(e, -100.0)).clamp(min=-100)
    r = ((master.reshape(-1).double() - pf) / torch.pow(2.0, e - 8)).clamp(-1, 1) * levels
    return torch.round(r).to(torch.int8 if levels == 127 else torch.int16).view(param.shape)


def master_gap_in_24bit_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two fp32 masters in steps of the 24-bit master (2^8 fp32 bit
    patterns), treating +0 and −0 as equal."""
    ia, ib = a.reshape(-1).view(torch.int32).to(torch.int64), b.reshape(-1).view(torch.int32).to(torch.int64)
    gap = torch.where(a.reshape(-1) == b.reshape(-1), 0, (ia - ib).abs())
    return int(gap.max()) // 256 if gap.numel() else 0
