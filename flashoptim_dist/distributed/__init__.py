"""Engine adapters: FSDP2, FSDP1, DDP — one canonical optimizer state layout for all of them.

Importing this package (``flashoptim_dist`` does it) registers, without touching
``torch.distributed`` (no process group needed, no FSDP import):

* the DTensor adapter (:mod:`.fsdp2`, placement arithmetic in :mod:`flashoptim_dist.placements`) for FSDP2, HSDP,
  tensor parallelism and their combinations on 1-, 2- and 3-D meshes: a parameter is handed to
  the optimizer as the runs of its flattened global parameter that the rank holds (its row
  block, or one run per row under a ``Shard(1)`` column split), so state is bit-identical to the
  one-device step (see :mod:`.fsdp2`);
* the FSDP1 adapter (:mod:`.fsdp1`): FlatParameters (``use_orig_params=False``) work as they are;
  original parameters (``use_orig_params=True``) need :func:`prepare_fsdp1` before the optimizer
  is built;
* the gradient-release check (:mod:`.ddp`): release is refused under DDP and FSDP1;
* the FSDP2 release units (:func:`.fsdp2.fsdp2_release_units`): release steps one
  ``fully_shard`` unit per launch.

DDP and plain replicated training need nothing: whole tensors are the default.

Usage::

    # FSDP2 (HSDP: pass a 2-D mesh)
    model = cast_model(model, torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    fully_shard(model, mesh=mesh)
    opt = FlashAdamW(model.parameters(), lr=3e-4)
    handle = enable_gradient_release_with_clipping(model, opt, max_norm=1.0)   # optional

    # FSDP2 + tensor parallelism (torchtitan's order: TP on the "tp" mesh dim, FSDP on "dp")
    mesh = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], plan)        # ColwiseParallel / RowwiseParallel / ...
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = FlashAdamW(model.parameters(), lr=3e-4)        # nothing else changes

    # FSDP1
    model = FullyShardedDataParallel(model, use_orig_params=True, ...)
    prepare_fsdp1(model)
    opt = FlashAdamW(model.parameters(), lr=3e-4)
"""

from __future__ import annotations

from .. import layout as _layout
from .. import release as _release
from .clip import ClippedReleaseHandle, clip_coefficient, enable_gradient_release_with_clipping, grad_norm
from .ddp import check_gradient_release, find_ddp
from .fsdp1 import FSDP1_PADDING_KEY, fsdp1_shard_adapter, is_fsdp1_param, prepare_fsdp1
from .fsdp2 import (
    check_fsdp2_unit,
    chunk_range,
    dtensor_row_block,
    fsdp2_release_units,
    fsdp2_shard_adapter,
    is_dtensor,
    reduce_partial_grads,
)

_layout.register_shard_adapter(fsdp2_shard_adapter)
_layout.register_shard_adapter(fsdp1_shard_adapter)
_release.register_release_check(check_gradient_release)
_release.register_release_units(fsdp2_release_units)

__all__ = [
    "prepare_fsdp1",
    "grad_norm",
    "clip_coefficient",
    "enable_gradient_release_with_clipping",
    "ClippedReleaseHandle",
    "check_gradient_release",
    "check_fsdp2_unit",
    "find_ddp",
    "fsdp2_shard_adapter",
    "fsdp1_shard_adapter",
    "dtensor_row_block",
    "chunk_range",
    "is_dtensor",
    "reduce_partial_grads",
    "is_fsdp1_param",
    "FSDP1_PADDING_KEY",
]
