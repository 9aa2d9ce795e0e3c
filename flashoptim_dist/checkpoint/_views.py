"""What a rank holds, in canonical terms, for every engine: the one place that knows engines.

:func:`build_view` turns ``(model, optimizer)`` into

* ``params``: per parameter FQN (wrapper prefixes removed) its global shape and dtype and the
  runs of its flattened global index this rank stores in the *model* (for writing parameters
  that no optimizer manages, and for loading into model storage the optimizer does not share);
* ``tensors``: every optimizer tensor with its :class:`~flashoptim_dist.layout.StateLayout`
  and its segments, each tagged with the FQN it belongs to (a DeepSpeed flat partition holds
  fragments of many parameters; its ``key=None`` padding segments are skipped).

Nothing here depends on how an engine shards beyond :func:`flashoptim_dist.layout.resolve_shard`
(the adapters) and, for DeepSpeed, ``flashoptim_dist.deepspeed.flat_partitions`` and the ZeRO-3
partition arithmetic (``ds_shape``/``ds_tensor``, docs/deepspeed-internals.md (a)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import layout as lay
from .._dist import is_deepspeed_engine, is_dtensor, rank_world
from ..optim.base import FlashOptimizer
from ..reference import FAMILIES
from ._format import CheckpointError

_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_fqn(name: str) -> str:
    """FQN without wrapper components (FSDP1, activation checkpointing, torch.compile)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    while True:
        if is_deepspeed_engine(model):
            model = model.module
            continue
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def client_optimizer(optimizer):
    """The optimizer that owns the state: follows ``.optimizer`` through DeepSpeed's ZeRO
    optimizer and wrappers such as Accelerate's."""
    seen = 0
    o = optimizer
    while o is not None and not isinstance(o, FlashOptimizer) and hasattr(o, "optimizer") and seen < 8:
        o = o.optimizer
        seen += 1
    if isinstance(o, torch.optim.Optimizer):
        return o
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    return o


def _detect_engine(model, module: nn.Module) -> str:
    if is_deepspeed_engine(model):
        from ..deepspeed import zero_stage_of

        st = zero_stage_of(model.optimizer)
        return f"zero{st}" if st else "deepspeed"
    for m in module.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    for p in module.parameters():
        if is_dtensor(p):
            return "fsdp2"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    _, w = rank_world()
    return "replicated" if w > 1 else "single"


def reshard_fsdp2(module: nn.Module) -> int:
    """Put every FSDP2 unit of ``module`` back into its sharded state; returns how many units
    there are.

    A forward without a backward (evaluation under ``torch.no_grad``) leaves the root unit's
    parameters unsharded: FSDP2 keeps the root gathered for the backward it expects, and while
    it is, the module holds plain full tensors instead of the sharded DTensors the optimizer
    updates. ``FSDPModule.reshard()`` (public, not recursive, a no-op for a unit that is already
    sharded, no communication) registers the sharded parameters again; the next forward gathers
    them as usual.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return 0
    n = 0
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
            n += 1
    return n


def _unmatched_error(unmatched: List[Tuple[torch.Tensor, int]], params: Dict[str, "ParamInfo"]) -> CheckpointError:
    """The error for optimizer tensors that are not parameters of the model (nothing is written)."""
    shapes = [f"{list(t.shape)} (param group {gi})" for t, gi in unmatched]
    more = " ..." if len(shapes) > 6 else ""
    held = f"{len(unmatched)} optimizer tensor(s) of global shape {', '.join(shapes[:6])}{more}"
    plain = [
        f
        for f, pi in params.items()
        if not is_dtensor(pi.param) and any(list(pi.global_shape) == list(t.shape) for t, _ in unmatched)
    ]
    if any(is_dtensor(t) for t, _ in unmatched) and plain:
        return CheckpointError(
            f"the optimizer holds DTensor shards whose parameters are not in their sharded state in the model: "
            f"{', '.join(plain[:8])} {'is a plain full tensor' if len(plain) == 1 else 'are plain full tensors'} "
            f"({held}); FSDP2 leaves a unit unsharded after a forward without backward. Call m.reshard() on every "
            "FSDPModule (for m in model.modules(): if isinstance(m, FSDPModule): m.reshard()) before saving or "
            "loading; nothing was written or loaded"
        )
    return CheckpointError(
        f"{held} {'is' if len(unmatched) == 1 else 'are'} not a parameter of the model passed to save/load, so "
        "their state would be missing from the checkpoint; pass the model the optimizer was built for (the same "
        "wrapped module), or build the optimizer over model.parameters(). Nothing was written or loaded"
    )


@dataclasses.dataclass
class ParamInfo:
    fqn: str
    param: torch.Tensor
    global_shape: Tuple[int, ...]
    dtype: torch.dtype
    runs: List[Tuple[int, torch.Tensor]]  # (global_start, 1-D local view): what this rank holds
    extra_load_runs: List[Tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    """More local storage of the same values, filled at load but never written (a gathered copy)."""

    @property
    def numel(self) -> int:
        return math.prod(self.global_shape)


@dataclasses.dataclass
class SegInfo:
    fqn: str
    seg: lay.Segment
    soff: int  # offset of this segment's scales in the tensor's scale vectors


@dataclasses.dataclass
class TensorInfo:
    tensor: torch.Tensor  # the optimizer's key (param object / flat partition)
    local: torch.Tensor  # 1-D local storage
    layout: lay.StateLayout
    group: int
    segs: List[SegInfo]  # non-padding, non-empty segments


@dataclasses.dataclass
class View:
    engine: str
    module: nn.Module
    client: object
    flash: bool
    params: Dict[str, ParamInfo]
    buffers: Dict[str, torch.Tensor]
    tensors: List[TensorInfo]
    state_names: List[Tuple[str, str]]  # (name, kind) of the optimizer family (Flash only)

    def fingerprint(self) -> Dict[str, list]:
        fp = {f: [list(pi.global_shape), str(pi.dtype).replace("torch.", "")] for f, pi in self.params.items()}
        return fp


def _persistent_buffers(module: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for mname, mod in module.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is None or bname in mod._non_persistent_buffers_set:
                continue
            fqn = clean_fqn(f"{mname}.{bname}" if mname else bname)
            out.setdefault(fqn, buf)
    return out


def _is_padding_key(key) -> bool:
    return isinstance(key, str) and key.startswith("<") and key.endswith(">")


def _param_info(fqn: str, p: torch.Tensor) -> ParamInfo:
    if type(p).__name__ == "FlatParameter":
        raise CheckpointError(
            "FSDP1 with use_orig_params=False is not supported by flashoptim_dist.checkpoint (its FlatParameters "
            "hide the original parameter names and shapes); wrap with FullyShardedDataParallel(..., "
            "use_orig_params=True) and call flashoptim_dist.distributed.prepare_fsdp1(model)"
        )
    if hasattr(p, "ds_shape") and hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partitioned param
        shape = tuple(int(s) for s in p.ds_shape)
        numel = math.prod(shape)
        part = p.ds_tensor
        ps = int(getattr(part, "ds_numel", part.numel()))
        r = dist.get_rank(getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
        start = r * ps
        valid = max(0, min(ps, numel - start))
        runs = [(start, part.data.view(-1)[:valid])] if valid else []
        extra = []
        if p.data.numel() == numel and numel > 0:
            # gathered right now (ZeRO-3 persistent small params stay gathered between steps)
            extra.append((0, p.data.view(-1)))
        return ParamInfo(fqn, p, shape, p.dtype, runs, extra)
    spec = lay.resolve_shard(p)
    local = spec.local(p) if spec.local is not None else p
    flat = local.detach().reshape(-1) if local.is_contiguous() else None
    if flat is None:
        raise CheckpointError(f"parameter {fqn} is not contiguous; make it contiguous before saving or loading")
    runs = [(s.global_start, flat[s.local_start : s.local_start + s.length]) for s in spec.segments if s.length > 0]
    return ParamInfo(fqn, p, tuple(int(s) for s in spec.global_shape), local.dtype, runs)


def _optimizer_tensors(model, client) -> List[Tuple[torch.Tensor, int]]:
    if is_deepspeed_engine(model):
        from ..deepspeed import flat_partitions, zero_stage_of

        zopt = model.optimizer
        flats = flat_partitions(model)
        if zero_stage_of(zopt) == 3:
            ids = getattr(zopt, "sub_group_to_group_id", None) or {}
            return [(t, int(ids.get(i, 0))) for i, t in enumerate(flats)]
        return [(t, i) for i, t in enumerate(flats)]
    out = []
    for gi, g in enumerate(client.param_groups):
        for t in g["params"]:
            out.append((t, gi))
    return out


def build_view(model, optimizer=None) -> View:
    """Describe what this rank holds of ``model`` (and ``optimizer``) in global coordinates.

    FSDP2 units left unsharded (e.g. the root after an evaluation forward) are resharded first
    (:func:`reshard_fsdp2`). Raises :class:`CheckpointError` when an optimizer tensor cannot be
    matched to a parameter of ``model``, so nothing is ever saved or loaded with state missing.
    """
    module = unwrap_model(model)
    reshard_fsdp2(module)
    engine = _detect_engine(model, module)
    deepspeed = is_deepspeed_engine(model)
    client = client_optimizer(optimizer) if optimizer is not None else None
    flash = isinstance(client, FlashOptimizer)

    params: Dict[str, ParamInfo] = {}
    by_id: Dict[int, str] = {}
    for name, p in module.named_parameters():
        fqn = clean_fqn(name)
        if fqn in params:
            continue
        params[fqn] = _param_info(fqn, p)
        by_id[id(p)] = fqn
    buffers = {f: b for f, b in _persistent_buffers(module).items() if f not in params}

    tensors: List[TensorInfo] = []
    state_names: List[Tuple[str, str]] = []
    unmatched: List[Tuple[torch.Tensor, int]] = []
    if flash:
        cfg = client.config
        state_names = list(FAMILIES[client.family])
        for t, gi in _optimizer_tensors(model, client):
            if deepspeed and lay.get_shard_spec(t) is None:
                raise CheckpointError(
                    f"a ZeRO flat partition of {t.numel()} elements (param group {gi}) carries no fragment layout, so "
                    "which parameters it holds is unknown; build the engine with flashoptim_dist.deepspeed.initialize "
                    "(or call flashoptim_dist.deepspeed.register() before deepspeed.initialize), or call "
                    "flashoptim_dist.deepspeed.attach_shard_specs(engine) right after deepspeed.initialize"
                )
            spec = lay.resolve_shard(t)
            local = spec.local(t) if spec.local is not None else t
            layout = lay.spec_layout(local, spec, cfg)
            segs = []
            for run in lay.segment_runs(layout):
                seg = run.segment
                if _is_padding_key(seg.key):
                    continue  # padding inside a flat partition (DeepSpeed: None, FSDP1: "<fsdp1 padding>")
                if seg.key is None and deepspeed:
                    continue  # padding between/after the parameter fragments of a ZeRO flat partition
                fqn = seg.key if seg.key is not None else by_id.get(id(t))
                if fqn is None:
                    unmatched.append((t, gi))
                    break
                fqn = clean_fqn(fqn)
                if fqn not in params:
                    raise CheckpointError(
                        f"the optimizer holds a segment of {fqn!r}, which is not a parameter of the model "
                        "passed to save/load; pass the model the optimizer was built for"
                    )
                pi = params[fqn]
                if seg.global_numel not in (-1, pi.numel):
                    raise CheckpointError(
                        f"optimizer segment of {fqn} says the parameter has {seg.global_numel} elements, "
                        f"the model says {pi.numel} ({list(pi.global_shape)}); the engine adapter's ShardSpec is "
                        "inconsistent"
                    )
                if seg.global_start < 0 or seg.global_start + seg.length > pi.numel:
                    raise CheckpointError(
                        f"optimizer segment [{seg.global_start}, {seg.global_start + seg.length}) of {fqn} lies "
                        f"outside the parameter's {pi.numel} elements; the engine adapter's ShardSpec is inconsistent"
                    )
                segs.append(SegInfo(fqn, seg, run.scale_start))
            tensors.append(TensorInfo(t, local.detach().reshape(-1), layout, gi, segs))
    if unmatched:
        raise _unmatched_error(unmatched, params)
    return View(engine, module, client, flash, params, buffers, tensors, state_names)


def n_state_slots(client: FlashOptimizer, group: dict) -> int:
    return client.n_state_slots(group)
