"""ShardSpecs for the flat partitions DeepSpeed ZeRO hands a client optimizer.

The optimizer tensor of a ZeRO group (ZeRO-1/2) or sub-group (ZeRO-3) is one 1-D tensor that packs
fragments of many parameters plus alignment padding. Each fragment becomes one
:class:`~flashoptim_dist.layout.Segment` keyed by the parameter's FQN whose ``global_start`` is
the fragment's offset inside the parameter's flattened global index, so quantization groups land
in the same canonical places as on one device; padding becomes ``key=None`` segments. See
docs/deepspeed-internals.md (a) for where DeepSpeed records the fragments.

Everything DeepSpeed keeps private is feature-detected; a missing attribute raises
:class:`DeepSpeedInternalsError` naming the installed DeepSpeed version.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from flashoptim_dist.layout import FORM_LOCAL, Segment, ShardSpec, get_shard_spec, set_shard_spec

__all__ = ["DeepSpeedInternalsError", "attach_shard_specs", "zero_stage_of", "tile_segments"]

log = logging.getLogger(__name__)


class DeepSpeedInternalsError(RuntimeError):
    """DeepSpeed does not have an internal attribute flashoptim_dist.deepspeed relies on."""


def _ds_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except Exception:  # pragma: no cover
        return "unknown"


def _need(obj, attr: str, what: str):
    if not hasattr(obj, attr):
        raise DeepSpeedInternalsError(
            f"DeepSpeed {_ds_version()}: {type(obj).__name__} has no attribute {attr!r} ({what}); "
            "flashoptim_dist.deepspeed was written against DeepSpeed 0.19.8 — install a version whose "
            "ZeRO internals match (pip install deepspeed==0.19.8) or report this version"
        )
    return getattr(obj, attr)


def zero_stage_of(zero_optimizer) -> int:
    """1/2 for DeepSpeedZeroOptimizer, 3 for the stage-3 optimizer, 0 for anything else."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat") and hasattr(zero_optimizer, "fp16_groups"):
        return 3
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups") and hasattr(zero_optimizer, "bit16_groups"):
        return 2 if getattr(zero_optimizer, "partition_gradients", False) else 1
    return 0


def tile_segments(fragments: List[Segment], numel: int) -> tuple:
    """Sort ``fragments`` by local offset and fill every gap (padding) with a ``key=None`` segment so
    the result tiles ``[0, numel)`` exactly."""
    out: List[Segment] = []
    pos = 0
    for seg in sorted(fragments, key=lambda s: s.local_start):
        if seg.length <= 0:
            continue
        if seg.local_start < pos:
            raise DeepSpeedInternalsError(
                f"DeepSpeed {_ds_version()}: parameter fragments overlap in a flat partition "
                f"({seg.key} at {seg.local_start} < {pos}); cannot build a segment list"
            )
        if seg.local_start > pos:
            out.append(Segment(pos, seg.local_start - pos, 0, None))
        out.append(seg)
        pos = seg.local_start + seg.length
    if pos > numel:
        raise DeepSpeedInternalsError(
            f"DeepSpeed {_ds_version()}: parameter fragments end at {pos} but the flat partition has {numel} elements"
        )
    if pos < numel:
        out.append(Segment(pos, numel - pos, 0, None))
    return tuple(out)


# ----------------------------------------------------------------------------------- ZeRO-1/2


def _zero12_layout(opt, i: int):
    """``(flat, [(param, offset in flat)], partition_start, partition_numel)`` of group ``i``: where
    DeepSpeed actually put every parameter in the flat bit16 buffer and which slice of it this
    rank's partition is.

    Read from the flattening record (``round_robin_bit16_groups``/``round_robin_bit16_offsets``,
    the order and offsets ``_update_model_bit16_weights`` uses) and the partition views
    (``parallel_partitioned_bit16_groups``), not from ``lp._hp_mapping``: DeepSpeed 0.19.8's
    ``_link_all_hp_params`` computes ``_hp_mapping`` in ``bit16_groups`` order, which differs from the
    buffer's order under ``zero_optimization.round_robin_gradients`` (the fragments then name the
    wrong elements). Returns None when this DeepSpeed lacks the record.
    """
    flats = getattr(opt, "bit16_groups_flat", None)
    order = getattr(opt, "round_robin_bit16_groups", None)
    offsets = getattr(opt, "round_robin_bit16_offsets", None)
    parts = getattr(opt, "parallel_partitioned_bit16_groups", None)
    groups = getattr(opt, "real_dp_process_group", None)
    if flats is None or order is None or offsets is None or parts is None or groups is None:
        return None
    if len(offsets) <= i or len(order[i]) != len(offsets[i]):
        return None
    import deepspeed.comm as dist

    flat = flats[i]
    rank = dist.get_rank(group=groups[i])
    part = parts[i][rank]
    if part.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        raise DeepSpeedInternalsError(
            f"DeepSpeed {_ds_version()}: the rank's bit16 partition of group {i} is not a view of the flat bit16 "
            "buffer; cannot tell which parameter elements it holds"
        )
    pstart = part.storage_offset() - flat.storage_offset()
    placed = []
    for lp, off in zip(order[i], offsets[i]):
        off = int(off)
        if lp.numel() and lp.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
            actual = lp.storage_offset() - flat.storage_offset()
            if actual != off:
                raise DeepSpeedInternalsError(
                    f"DeepSpeed {_ds_version()}: a parameter of group {i} lies at offset {actual} of the flat bit16 "
                    f"buffer but round_robin_bit16_offsets says {off}; cannot build a segment list"
                )
        placed.append((lp, off))
    return flat, placed, int(pstart), int(part.numel())


def _zero12_specs(opt, names: Dict[torch.Tensor, str]) -> List[tuple]:
    flats = _need(opt, "single_partition_of_fp32_groups", "the flat partitions given to the client optimizer")
    groups = _need(opt, "bit16_groups", "the model parameters of each group")
    result = []
    for i, flat in enumerate(flats):
        frags = []
        layout = _zero12_layout(opt, i)
        if layout is not None:
            _, placed, pstart, pnumel = layout
            if pnumel != flat.numel():
                raise DeepSpeedInternalsError(
                    f"DeepSpeed {_ds_version()}: group {i}'s partition has {flat.numel()} elements but its slice of "
                    f"the flat bit16 buffer has {pnumel}"
                )
            pend = pstart + pnumel
            for lp, off in placed:
                n = lp.numel()
                a, b = max(off, pstart), min(off + n, pend)
                if b <= a:
                    continue
                if lp not in names:
                    raise DeepSpeedInternalsError("a ZeRO parameter is missing from engine.param_names")
                frags.append(Segment(a - pstart, b - a, a - off, names[lp], int(n)))
        else:  # older DeepSpeed without the flattening record: DeepSpeed's own fragment addresses
            if getattr(opt, "round_robin_gradients", False):
                raise DeepSpeedInternalsError(
                    f"DeepSpeed {_ds_version()} has no round_robin_bit16_offsets and zero_optimization."
                    "round_robin_gradients is on: its fragment addresses (_hp_mapping) do not follow the reordered "
                    "buffer; set round_robin_gradients to false or use DeepSpeed 0.19.8"
                )
            for lp in groups[i]:
                if not hasattr(lp, "_hp_mapping"):
                    raise DeepSpeedInternalsError(
                        f"DeepSpeed {_ds_version()}: ZeRO-1/2 parameters carry no '_hp_mapping' (fragment address); "
                        "flashoptim_dist.deepspeed needs DeepSpeed 0.19.8's tensor_fragment linkage"
                    )
                m = lp._hp_mapping
                if m is None:
                    continue
                hp = _need(m, "hp_fragment_address", "fragment offset in the flat partition")
                lpa = _need(m, "lp_fragment_address", "fragment offset inside the parameter")
                if lp not in names:
                    raise DeepSpeedInternalsError("a ZeRO parameter is missing from engine.param_names")
                frags.append(Segment(int(hp.start), int(hp.numel), int(lpa.start), names[lp], int(lp.numel())))
        for f in frags:
            if f.global_start < 0 or f.global_start + f.length > f.global_numel:
                raise DeepSpeedInternalsError(
                    f"DeepSpeed {_ds_version()}: fragment [{f.global_start}, {f.global_start + f.length}) of {f.key} "
                    f"lies outside its {f.global_numel} elements"
                )
        result.append((flat, tile_segments(frags, flat.numel())))
    return result


def _zero12_dedupe(opt) -> int:
    """Point each bf16 master partition at the model's bit16 partition (DeepSpeed keeps a clone).
    Returns bytes freed per rank."""
    flats = opt.single_partition_of_fp32_groups
    parts = getattr(opt, "parallel_partitioned_bit16_groups", None)
    groups = getattr(opt, "real_dp_process_group", None)
    relink = getattr(opt, "_link_all_hp_params", None)
    if parts is None or groups is None or relink is None:
        log.warning(
            "DeepSpeed %s: ZeRO-1/2 internals for sharing the master partition are missing; keeping DeepSpeed's "
            "duplicate bf16 copy", _ds_version())
        return 0
    import deepspeed.comm as dist

    freed = 0
    for i, flat in enumerate(flats):
        bit16 = parts[i][dist.get_rank(group=groups[i])]
        if flat.data_ptr() == bit16.data_ptr():
            continue
        if flat.dtype != bit16.dtype or flat.device != bit16.device or flat.shape != bit16.shape:
            continue  # fp32 master partitions: not a duplicate
        freed += flat.numel() * flat.element_size()
        flat.data = bit16.data
    if freed:
        relink()  # _hp_mapping views must follow the new storage
    return freed


# ------------------------------------------------------------------------------------- ZeRO-3


def _zero3_specs(opt, names: Dict[torch.Tensor, str]) -> List[tuple]:
    flats = _need(opt, "fp32_partitioned_groups_flat", "the sub-group partitions given to the client optimizer")
    groups = _need(opt, "fp16_groups", "the model parameters of each sub-group")
    dp_group = getattr(opt, "dp_process_group", None)
    import deepspeed.comm as dist

    result = []
    for i, flat in enumerate(flats):
        frags = []
        offset = 0
        for p in groups[i]:
            for attr in ("ds_tensor", "ds_numel"):
                if not hasattr(p, attr):
                    raise DeepSpeedInternalsError(
                        f"DeepSpeed {_ds_version()}: ZeRO-3 parameter has no {attr!r}; cannot locate its partition"
                    )
            ps = int(getattr(p.ds_tensor, "ds_numel", p.ds_tensor.numel()))
            rank = dist.get_rank(group=getattr(p, "ds_process_group", dp_group))
            start = rank * ps
            valid = max(0, min(ps, int(p.ds_numel) - start))
            if valid:
                if p not in names:
                    raise DeepSpeedInternalsError("a ZeRO-3 parameter is missing from engine.param_names")
                frags.append(Segment(offset, valid, start, names[p], int(p.ds_numel)))
            offset += ps
        if offset != flat.numel():
            raise DeepSpeedInternalsError(
                f"DeepSpeed {_ds_version()}: ZeRO-3 sub-group {i} has {flat.numel()} elements but its parameter "
                f"partitions add up to {offset}"
            )
        result.append((flat, tile_segments(frags, flat.numel())))
    return result


def _zero3_dedupe(opt) -> int:
    lps = getattr(opt, "fp16_partitioned_groups_flat", None)
    if lps is None:
        log.warning("DeepSpeed %s: ZeRO-3 has no fp16_partitioned_groups_flat; keeping the duplicate copy",
                    _ds_version())
        return 0
    freed = 0
    for lp, hp in zip(lps, opt.fp32_partitioned_groups_flat):
        if lp is None or hp is lp or hp.data_ptr() == lp.data_ptr():
            continue
        if hp.dtype != lp.dtype or hp.device != lp.device or hp.shape != lp.shape:
            continue
        freed += hp.numel() * hp.element_size()
        hp.data = lp.data
    return freed


# ------------------------------------------------------------------------------------ public


def attach_shard_specs(engine, *, dedupe: bool = True) -> dict:
    """Attach a :class:`ShardSpec` to every flat partition the engine's ZeRO optimizer gives the
    client optimizer, and (``dedupe=True``) drop DeepSpeed's duplicate bf16 master copy.

    Call after ``deepspeed.initialize`` (``flashoptim_dist.deepspeed.initialize`` does). Returns
    ``{"stage": int, "tensors": n, "segments": n, "dedupe_bytes": n}``.
    """
    opt = engine.optimizer
    names = _need(engine, "param_names", "parameter -> FQN map")
    stage = zero_stage_of(opt)
    if stage == 0:
        if hasattr(opt, "fp32_groups_flat_partition") or hasattr(opt, "fp32_groups_flat"):
            raise DeepSpeedInternalsError(
                f"DeepSpeed wrapped the Flash optimizer in {type(opt).__name__}, which keeps fp32 master copies; "
                "use zero_optimization.stage 1, 2 or 3 without data_types.grad_accum_dtype=fp32"
            )
        return {"stage": 0, "tensors": 0, "segments": 0, "dedupe_bytes": 0}
    freed = 0
    if stage == 3:
        if dedupe:
            freed = _zero3_dedupe(opt)
        specs = _zero3_specs(opt, names)
    else:
        if dedupe:
            freed = _zero12_dedupe(opt)
        specs = _zero12_specs(opt, names)
    nseg = 0
    for flat, segs in specs:
        # state_dict() keeps the stored per-rank tensors: DeepSpeed saves the client optimizer's
        # state per rank and the readers (zero_checkpoint.py, zero_to_fp32.py) read them as stored
        set_shard_spec(flat, ShardSpec(global_shape=tuple(flat.shape), segments=segs, state_dict_form=FORM_LOCAL))
        nseg += len(segs)
    return {"stage": stage, "tensors": len(specs), "segments": nseg, "dedupe_bytes": freed}


def flat_partitions(engine) -> List[torch.Tensor]:
    """The optimizer tensors (flat partitions) of a ZeRO engine, in DeepSpeed's group order."""
    opt = engine.optimizer
    stage = zero_stage_of(opt)
    if stage == 3:
        return list(opt.fp32_partitioned_groups_flat)
    if stage in (1, 2):
        return list(opt.single_partition_of_fp32_groups)
    return []


def spec_of(t: torch.Tensor) -> Optional[ShardSpec]:
    return get_shard_spec(t)
