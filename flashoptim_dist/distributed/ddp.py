"""DDP and plain replicated training; which engines gradient release works under.

DDP / replicated training needs no adapter: every rank holds whole tensors, which is the
optimizer's default (one Segment per tensor, global start 0), so a Flash optimizer under DDP
computes exactly what it computes on one device from the same (all-reduced) gradients.

Gradient release (:func:`flashoptim_dist.enable_gradient_release`) steps each parameter in its
post-accumulate-grad hook. That hook fires at a different moment under each engine:

* **FSDP2** (``fully_shard``, including HSDP and FSDP2-based ``replicate``): FSDP2 calls the hooks
  itself on the *sharded* parameter after the reduce-scatter (and the HSDP all-reduce), so the
  hook sees the final gradient shard. Works; the grad shard is freed right after its update.
* **DDP** (``DistributedDataParallel``, composable ``replicate`` based on it): autograd fires the
  hook after the *local* accumulation, before DDP's bucketed all-reduce has averaged the
  gradient, so each rank would step with its own un-averaged gradient and the replicas would
  drift apart. DDP also keeps full-size gradient buckets, so release would save no memory.
  Refused by :func:`check_gradient_release`.
* **FSDP1** (``FullyShardedDataParallel``): forward runs on views of the flat parameter, so the
  original parameters' hooks never fire and nothing would be updated. Refused.
* single device / manual replication (all-reduce gradients yourself before they accumulate):
  works, as on one device.

:func:`check_gradient_release` is registered with the core's release checks when
``flashoptim_dist.distributed`` is imported, so ``enable_gradient_release`` raises these errors.
"""

from __future__ import annotations

import torch

from .fsdp1 import is_fsdp1_param

__all__ = ["check_gradient_release", "find_ddp"]


def find_ddp(model: torch.nn.Module):
    """The DDP-style wrapper found in ``model`` (the module itself or a submodule), else None."""
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
    except ImportError:  # pragma: no cover
        DDP = ()
    try:
        from torch.distributed._composable_state import _get_module_state
    except ImportError:  # pragma: no cover
        _get_module_state = None
    for m in model.modules():
        if DDP and isinstance(m, DDP):
            return m
        if _get_module_state is not None:
            st = _get_module_state(m)
            # composable replicate() built on DDP (torch.distributed._composable.replicate);
            # the FSDP2-based replicate (replicate_with_fsdp) runs hooks after its all-reduce
            if st is not None and type(st).__module__.endswith("_composable.replicate"):
                return m
    return None


def check_gradient_release(model: torch.nn.Module, optimizer) -> None:
    """Raise if gradient release cannot be correct for ``model`` under its engine (see module
    docstring); return silently otherwise."""
    ddp = find_ddp(model)
    if ddp is not None:
        raise RuntimeError(
            f"gradient release does not work under DistributedDataParallel ({type(ddp).__name__}): "
            "the post-accumulate-grad hook fires on the local gradient before DDP's bucketed "
            "all-reduce averages it, so every rank would step with a different gradient, and DDP "
            "keeps full-size gradient buckets, so release would save no memory anyway. Fix: call "
            "optimizer.step() after backward under DDP, or shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard), where release runs after the reduce-scatter "
            "and frees each gradient shard."
        )
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_fsdp1_param(p):
                raise RuntimeError(
                    "gradient release does not work under FSDP1 (FullyShardedDataParallel): its "
                    "forward runs on views of the flat parameter, so the original parameters' "
                    "post-accumulate-grad hooks never fire and no parameter would be updated. Fix: "
                    "call optimizer.step() after backward under FSDP1, or shard with FSDP2 "
                    "(torch.distributed.fsdp.fully_shard), where release works."
                )
