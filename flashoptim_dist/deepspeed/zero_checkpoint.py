"""Reading a DeepSpeed ZeRO checkpoint written with a Flash optimizer (``engine.save_checkpoint``):
every rank's flat partitions with the segments (fragments of parameters) the optimizer used.

Two converters build on it: :func:`flashoptim_dist.deepspeed.convert_to_plain_checkpoint`
(DeepSpeed's own Adam format) and ``flashoptim-dist ckpt convert``
(:mod:`flashoptim_dist.checkpoint._convert`, the canonical format). It lives here, below the
checkpoint package, because it reads DeepSpeed's files and nothing of ours.

What DeepSpeed stores (docs/deepspeed-internals.md (e)), per rank ``r`` of the save:

* ZeRO-1/2 ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: the client optimizer's state dict
  (``base_optimizer_state``: per param group one flat partition's ρ, codes, scales, step), the bf16
  partitions (``single_partition_of_fp32_groups``, tail padding removed) and, per group,
  ``param_slice_mappings`` {name: (start in the partition, numel)}. A parameter's fragments lie in
  rank order, so the fragment on rank ``r`` starts, inside the parameter, at the sum of its
  fragments on ranks < r.
* ZeRO-3 ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: per sub-group the client state and
  ``fp32_flat_groups``; ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` has ``param_shapes`` per
  sub-group. Each parameter is cut into ``ceil(numel / world)`` element partitions; rank ``r``
  holds ``[r·ps, min((r+1)·ps, numel))`` at its offset in the sub-group.

Memory: the whole checkpoint is held in host memory (≈5 bytes/param).
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Dict

import torch

from .. import layout as lay
from .. import numerics as nx
from .._errors import CheckpointError
from .._names import DEFAULT_OF_FAMILY
from ..config import FlashConfig
from ._shards import tile_segments

__all__ = ["read_zero_checkpoint"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _tag_dir(path: str, tag) -> str:
    if tag is None:
        latest = os.path.join(path, "latest")
        if os.path.isfile(latest):
            tag = open(latest).read().strip()
        elif glob.glob(os.path.join(path, "*optim_states.pt")):
            return path
        else:
            raise CheckpointError(f"{path}: no 'latest' file and no *optim_states.pt; pass the tag directory or --tag")
    d = os.path.join(path, str(tag))
    if not os.path.isdir(d):
        raise CheckpointError(f"{path}: tag directory {tag!r} does not exist")
    return d


def read_zero_checkpoint(path, tag=None) -> dict:
    """Every rank's flat partitions of a DeepSpeed checkpoint written with a Flash optimizer, with
    the segments (fragments of parameters) the optimizer used — the layout its scales follow.

    Returns a dict: ``dir``, ``optim_files``, ``model_sd`` (rank 0's model states), ``stage``,
    ``world``, ``fmeta`` (the client's "flashoptim" entry), ``config`` (FlashConfig), ``cls_name``,
    ``groups`` (param-group hyper-parameters), ``shapes`` ({name: shape}), ``frozen`` and
    ``ranks``: per rank ``(optimizer_state_dict, [(local, segments, group index, state), ...])``,
    one entry per saved flat partition in save order. ρ is returned in the current form (the bit
    split for bf16; a checkpoint of state format ≤ 2 is converted, numerics.rho_from_linear).
    """
    d = _tag_dir(os.fspath(path), tag)
    optim_files = sorted(glob.glob(os.path.join(d, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")),
                         key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    if not optim_files:
        raise CheckpointError(f"{d}: no ZeRO optimizer state files (*zero_pp_rank_*_optim_states.pt)")
    world = len(optim_files)
    model_files = sorted(glob.glob(os.path.join(d, "*mp_rank_00_model_states.pt")))
    model_sd = _load(model_files[0])
    ranks = [_load(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(getattr(ranks[0]["zero_stage"], "value", ranks[0]["zero_stage"]))
    base_key = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    client_sd = ranks[0][base_key]
    fmeta = client_sd.get("flashoptim")
    if fmeta is None:
        raise CheckpointError(
            f"{optim_files[0]}: the client optimizer state has no 'flashoptim' entry; this DeepSpeed checkpoint "
            "was not written with a flashoptim_dist optimizer (use DeepSpeed's own tools)")
    cfg = FlashConfig(**fmeta["config"])
    cls_name = ((model_sd.get("ds_config") or {}).get("optimizer") or {}).get("type") or DEFAULT_OF_FAMILY[
        fmeta["family"]
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in client_sd["param_groups"]]
    shapes = model_sd["param_shapes"]
    all_shapes: Dict[str, tuple] = {}
    for od in shapes:
        for n, s in od.items():
            all_shapes[n] = tuple(int(x) for x in s)
    frozen = model_sd.get("frozen_param_shapes") or {}
    if frozen and stage == 3:
        raise CheckpointError("converting ZeRO-3 checkpoints with frozen parameters is not supported")

    per_rank = []
    offsets: Dict[str, int] = {}  # ZeRO-1/2: elements of each param seen on lower ranks
    for r, osd in enumerate(ranks):
        csd = osd[base_key]
        tensors = []
        if stage in (1, 2):
            parts = osd["single_partition_of_fp32_groups"]
            for gi, (part, mapping) in enumerate(zip(parts, osd["param_slice_mappings"])):
                st = dict(csd["state"][gi])
                numel = st["rho"].numel() if "rho" in st else part.numel()
                local = torch.zeros(numel, dtype=part.dtype)
                local[: part.numel()] = part
                frags = []
                for name, addr in mapping.items():
                    start, n = int(addr.start), int(addr.numel)
                    gs = offsets.get(name, 0)
                    offsets[name] = gs + n
                    frags.append(lay.Segment(start, n, gs, name, math.prod(all_shapes[name])))
                tensors.append((local, tile_segments(frags, numel), gi, st))
        else:
            flats = osd["fp32_flat_groups"]
            for si, (flat, od) in enumerate(zip(flats, shapes)):
                st = dict(csd["state"][si])
                frags, off = [], 0
                for name, shape in od.items():
                    n = math.prod(shape)
                    ps = -(-n // world)
                    valid = max(0, min(ps, n - r * ps))
                    if valid:
                        frags.append(lay.Segment(off, valid, r * ps, name, n))
                    off += ps
                if off != flat.numel():
                    raise CheckpointError(
                        f"{optim_files[r]}: ZeRO-3 sub-group {si} has {flat.numel()} elements, its parameters' "
                        f"partitions add up to {off}; this DeepSpeed version lays partitions out differently"
                    )
                tensors.append((flat.clone(), tile_segments(frags, flat.numel()), 0 if len(groups) == 1 else None, st))
        if int(fmeta.get("format_version", 2)) <= 2:  # ρ of bf16 partitions in the linear form then
            for local, _, _, st in tensors:
                if "rho" in st:
                    st["rho"] = nx.rho_from_linear(local.reshape(-1), st["rho"].reshape(-1))
        per_rank.append((osd, tensors))
    if stage in (1, 2):
        for n, s in all_shapes.items():
            if offsets.get(n, 0) != math.prod(s):
                raise CheckpointError(
                    f"{d}: the fragments of {n} cover {offsets.get(n, 0)} of its {math.prod(s)} elements; the "
                    "checkpoint is incomplete or this DeepSpeed version stores fragments differently"
                )
    return dict(
        dir=d,
        optim_files=optim_files,
        model_sd=model_sd,
        stage=stage,
        world=world,
        fmeta=fmeta,
        config=cfg,
        cls_name=cls_name,
        groups=groups,
        shapes=all_shapes,
        frozen=frozen,
        ranks=per_rank,
    )
