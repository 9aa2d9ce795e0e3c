"""Shared pieces of the framework integration tests (tests/integrations/test_integrations_*.py).

CPU adaptations. Two frameworks refuse to shard on a CPU machine although everything they run
afterwards works on CPU/gloo; the tests patch exactly that refusal and nothing else, so the
code under test (preparation, parameter remapping, state dicts, checkpoint save/load, the
training loops) is the frameworks' own:

* :func:`accelerate_fsdp_on_cpu` — Accelerate 1.15 turns an FSDP plugin into
  ``DistributedType.FSDP`` only for accelerator devices (``accelerate/state.py``,
  ``AcceleratorState.__init__``: the FSDP branch sits under
  ``elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]``); on CPU the plugin is ignored
  and the model silently stays unsharded. The patch applies that branch's three assignments
  when the state came out as ``MULTI_CPU``/``NO`` with a plugin.
* :func:`fsdp1_on_cpu` — Lightning's ``FSDPStrategy`` passes ``device_id=root_device.index``
  (None on CPU) to ``FullyShardedDataParallel``, which then raises "FSDP needs a non-CPU
  accelerator device"; FSDP1 runs on CPU with ``device_id=torch.device("cpu")``. And its full
  state dicts use ``offload_to_cpu=True`` (``lightning/fabric/strategies/fsdp.py``,
  ``_get_full_state_dict_context``), under which FSDP1 on a CPU-only machine copies nothing
  (the "offload" is a no-op) and the entries point into buffers it frees: torch 2.13 segfaults
  in ``param_hook`` cloning the model state (any optimizer); the patch uses
  ``offload_to_cpu=False`` there, the setting docs/checkpoints.md gives for CPU machines.

Both return an undo function. GPU runs need neither (bench/integrations_gpu.sh).
"""

from __future__ import annotations

import functools

import torch

from flashoptim_dist.train.memory import tensor_bytes

__all__ = ["accelerate_fsdp_on_cpu", "fsdp1_on_cpu", "memory_per_param", "assert_flash_memory", "batch"]


def accelerate_fsdp_on_cpu():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    orig = AcceleratorState.__init__

    @functools.wraps(orig)
    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO):
            # accelerate/state.py, the FSDP branch for accelerator devices, verbatim in effect
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init

    def undo():
        AcceleratorState.__init__ = orig

    return undo


def fsdp1_on_cpu():
    import torch.distributed.fsdp as fsdp_mod

    cls = fsdp_mod.FullyShardedDataParallel
    orig = cls.__init__

    @functools.wraps(orig)
    def init(self, module, *args, **kwargs):
        if kwargs.get("device_id") is None and not torch.cuda.is_available():
            kwargs["device_id"] = torch.device("cpu")
        orig(self, module, *args, **kwargs)

    cls.__init__ = init

    import lightning.pytorch.strategies.fsdp as pl_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    orig_ctx = pl_fsdp._get_full_state_dict_context

    def full_ctx(module, world_size, rank0_only=True):
        return cls.state_dict_type(
            module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    pl_fsdp._get_full_state_dict_context = full_ctx

    def undo():
        cls.__init__ = orig
        pl_fsdp._get_full_state_dict_context = orig_ctx

    return undo


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def memory_per_param(params, optimizers) -> dict:
    """Bytes per parameter element on this rank, counted from the tensors: local parameter
    shards, their gradients and every tensor in the optimizers' state; plus the dtypes seen."""
    params = [p for p in params if p.requires_grad]
    locals_ = [_local(p) for p in params]
    grads = [_local(p.grad) for p in params if p.grad is not None]
    states = [_local(v) for opt in optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    n = sum(t.numel() for t in locals_)
    return {
        "n": n,
        "param": tensor_bytes(locals_) / n,
        "grad": tensor_bytes(grads) / n,
        "state": tensor_bytes(states) / n,
        "total": (tensor_bytes(locals_) + tensor_bytes(grads) + tensor_bytes(states)) / n,
        "param_dtypes": sorted({str(t.dtype) for t in locals_}),
        "grad_dtypes": sorted({str(t.dtype) for t in grads}),
        "state_dtypes": sorted({str(t.dtype) for t in states}),
    }


def assert_flash_memory(mem: dict, state_bytes=(3.125, 3.13), grads=True) -> None:
    """bf16 parameters and gradients, state in int8/uint8 codes and ρ with bf16 scales — no
    fp32 tensor anywhere — and FlashAdamW-24's 3.125 bytes of state per element (1 ρ + 1 + 1
    codes + 2 bf16 scales per 32; more only where shard boundaries cut groups, which the tests'
    models avoid)."""
    assert mem["param_dtypes"] == ["torch.bfloat16"], mem
    if grads:
        assert mem["grad_dtypes"] == ["torch.bfloat16"], mem
        assert mem["grad"] == 2.0, mem
    assert set(mem["state_dtypes"]) <= {"torch.int8", "torch.uint8", "torch.bfloat16"}, mem
    assert mem["param"] == 2.0, mem
    lo, hi = state_bytes
    assert lo <= mem["state"] <= hi, mem


def batch(step: int, rank: int, rows: int = 2, seq: int = 16, vocab: int = 96) -> torch.Tensor:
    """Tokens of one step on one rank, a function of (step, rank) only: a resumed run sees the
    batches the uninterrupted one saw."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (rows, seq), generator=g)
