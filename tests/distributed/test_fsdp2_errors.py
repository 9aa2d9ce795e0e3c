"""FSDP2 set-ups that must fail with a message naming the problem and the fix — or work.

* a ``fully_shard`` unit mixing bf16 and fp32 parameters → ValueError at optimizer construction
  (FSDP2 itself only fails at the first forward, with a bare AssertionError); the suggested fix
  (the fp32 layer in its own unit) then trains;
* a parameter sharded on dim 1 (``shard_placement_fn``) into pieces that cut quantization groups
  (16 of 32 columns) → ValueError naming ``Shard(dim=1)``, the column split and the fixes (an
  aligned dim-1 split is accepted: tests/distributed/test_tp.py);
* a gradient whose placements differ from its parameter's (never reduced) → RuntimeError at step;
* CPU-offloaded shards (``CPUOffloadPolicy``) work: the step equals the non-offloaded one bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_utils import run_distributed


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 64, bias=False)
        self.head = nn.Linear(64, 32, bias=False)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    return _Net().to(torch.bfloat16)


def _train_step(model, opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _errors_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard

    import flashoptim_dist as fo
    import flashoptim_dist.distributed  # noqa: F401

    mesh = init_device_mesh("cpu", (world,))
    msgs = {}

    # 1. mixed-dtype unit
    model = _net()
    model.norm.float()
    fully_shard(model, mesh=mesh)
    try:
        fo.FlashAdamW(model.parameters(), lr=1e-3)
        msgs["mixed"] = None
    except ValueError as e:
        msgs["mixed"] = str(e)
    # ... and the fix: the fp32 layer in its own unit
    model = _net()
    model.norm.float()
    fully_shard(model.norm, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fo.FlashAdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt)
    msgs["fix_ok"] = all(opt.state[p]["step"] == 1 for p in model.parameters())

    # 2. unsupported placement
    model = _net()
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else None)
    try:
        fo.FlashAdamW(model.parameters(), lr=1e-3)
        msgs["shard1"] = None
    except ValueError as e:
        msgs["shard1"] = str(e)

    # 3. a gradient that was never reduced
    model = _net()
    fully_shard(model, mesh=mesh)
    opt = fo.FlashAdamW(model.parameters(), lr=1e-3)
    p = model.body.weight
    full = torch.ones(p.shape, dtype=p.dtype)
    p.grad = DTensor.from_local(full, mesh, [Partial()], run_check=False)
    try:
        opt.step()
        msgs["partial_grad"] = None
    except RuntimeError as e:
        msgs["partial_grad"] = str(e)

    # 4. CPU offload works and matches the non-offloaded step bit for bit
    results = []
    for offload in (False, True):
        model = _net()
        kw = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload else {}
        fully_shard(model, mesh=mesh, **kw)
        opt = fo.FlashAdamW(model.parameters(), lr=1e-2)
        for s in range(3):
            _train_step(model, opt, seed=s)
        results.append([p._local_tensor.clone() for p in model.parameters()])
    msgs["offload_equal"] = all(torch.equal(a, b) for a, b in zip(*results))
    return msgs


def test_fsdp2_errors_and_offload():
    msgs = run_distributed(_errors_worker, 2)[0]
    m = msgs["mixed"]
    assert m is not None, "a mixed bf16/fp32 fully_shard unit must be refused"
    for part in (
        "unit on _Net holds trainable parameters of 2 dtypes",
        "torch.float32: norm.weight, norm.bias",
        "layers kept in torch.float32 must sit in their own fully_shard unit",
    ):
        assert part in m, m
    assert msgs["fix_ok"]
    m = msgs["shard1"]
    assert m is not None, "a Shard(1) split cutting groups must be refused"
    for part in ("Shard(dim=1)", "'body.weight'", "columns [0, 16), [16, 32)", "group size 32", "shard_placement_fn",
                 "Shard(0)", "group_size=16"):
        assert part in m, m
    m = msgs["partial_grad"]
    assert m is not None and "Partial" in m and "redistribute" in m, m
    assert msgs["offload_equal"]


def test_adapter_ignores_plain_tensors_and_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, flashoptim_dist.distributed as d, torch;"
        "assert d.fsdp2_shard_adapter(torch.zeros(3)) is None;"
        "assert d.fsdp1_shard_adapter(torch.zeros(3)) is None;"
        "bad = [m for m in ('torch.distributed.fsdp', 'torch.distributed.tensor') if m in sys.modules];"
        "assert not bad, bad;"
        "import torch.distributed as dist; assert not dist.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
