"""Planning of ``load()`` (:mod:`._load`): which DCP reads fill which local buffers, and the
re-encoding of what was read when the checkpoint's numeric config differs from the target's.

:func:`plan_load` returns a :class:`PlannedLoad`; ``_load._install`` consumes it after the read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from .. import layout as lay
from .. import numerics as nx
from ..optim.base import FlashOptimizer, allocate_state
from ..reference import FAMILIES
from . import _format as F
from ._dcp import Chunked
from ._views import View, n_state_slots


@dataclass
class Source:
    """What a checkpoint holds, independent of who wrote it (flashoptim_dist or plain DCP)."""

    path: str
    kind: str  # "flash" | "torch"
    dcp_md: Any
    meta: Optional[dict]
    params: Dict[str, dict]  # fqn -> {"shape", "dtype" (stored), "key"}
    buffers: Dict[str, dict]
    optimizer: Optional[dict]  # normalized optimizer description (see _flash_source/_torch_source)
    world_size: Optional[int]
    byte_keys: Dict[str, str] = field(default_factory=dict)  # purpose -> key
    #: ρ of bf16 parameters in the linear form (format versions ≤ 2; numerics.rho_from_linear)
    linear_rho: bool = False


def _source_rho_dtype(src: Source) -> Optional[torch.dtype]:
    if src.kind != "flash" or not src.optimizer:
        return None
    bits = src.optimizer["config"].get("master_weight_bits")
    return {24: torch.int8, 32: torch.int16}.get(bits)


def _master(pbuf: torch.Tensor, rho: Optional[torch.Tensor], linear: bool = False) -> torch.Tensor:
    if rho is None or pbuf.dtype == torch.float32:
        return pbuf.float()
    return nx.merge_master(pbuf, rho, linear)


def _split(master: torch.Tensor, dtype: torch.dtype, rho_dtype: Optional[torch.dtype]):
    if rho_dtype is None or dtype == torch.float32:
        return master.to(dtype), None
    return nx.split_master(master, dtype, rho_dtype)


def _saved_shape(src: Source, key: str, default: tuple) -> tuple:
    """The global shape ``key`` has in the checkpoint (scales: 1-D in format version 1, the row
    form of :func:`~flashoptim_dist.checkpoint._format.scales_shape` since version 2)."""
    md = src.dcp_md.state_dict_metadata.get(key) if src.dcp_md is not None else None
    size = getattr(md, "size", None)
    return tuple(size) if size is not None else tuple(default)


@dataclass
class _SegRead:
    """Staging of one local run in the checkpoint's own format."""

    fqn: str
    gs: int
    L: int
    param: torch.Tensor
    rho: Optional[torch.Tensor] = None
    states: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor], int]] = field(
        default_factory=dict
    )  # name -> (vals, scales, G)


def _stage_run(
    targets: Dict[str, Chunked],
    src: Source,
    fqn: str,
    gs: int,
    L: int,
    device,
    *,
    with_opt: bool,
    names: List[Tuple[str, str]],
) -> _SegRead:
    """Add reads of the run [gs, gs+L) of parameter ``fqn`` (param, and its optimizer state when
    ``with_opt``) in the checkpoint's format; return the staging buffers."""

    def chunked(key, shape, dtype):
        ch = targets.get(key)
        if ch is None:
            ch = targets[key] = Chunked(tuple(shape), dtype)
        return ch

    pd = src.params[fqn]
    pdtype = F.dtype_from_name(pd["dtype"])
    r = _SegRead(fqn, gs, L, torch.empty(L, dtype=pdtype, device=device))
    chunked(pd["key"], pd["shape"], pdtype).add_run(gs, r.param)
    opt = src.optimizer
    if not with_opt or opt is None:
        return r
    if src.kind == "flash":
        rdt = _source_rho_dtype(src)
        if rdt is not None and pdtype != torch.float32:
            r.rho = torch.empty(L, dtype=rdt, device=device)
            chunked(F.rho_key(fqn), pd["shape"], rdt).add_run(gs, r.rho)
        Gs = opt["config"]["group_size"]
        quant = opt["config"]["quantize"]
        for name, kind in names:
            key = F.state_key(fqn, name)
            if key not in src.dcp_md.state_dict_metadata:
                continue
            if quant:
                dt = torch.int8 if kind == "signed" else torch.uint8
                vals = torch.empty(L, dtype=dt, device=device)
                ng = lay.num_groups(L, gs % Gs, Gs)
                sc = torch.empty(ng, dtype=torch.bfloat16, device=device)
                chunked(key, pd["shape"], dt).add_run(gs, vals)
                skey = F.scales_key(fqn, name)
                chunked(skey, _saved_shape(src, skey, F.scales_shape(pd["shape"], Gs)), torch.bfloat16).add_run(
                    gs // Gs, sc
                )
                r.states[name] = (vals, sc, Gs)
            else:
                vals = torch.empty(L, dtype=torch.float32, device=device)
                chunked(key, pd["shape"], torch.float32).add_run(gs, vals)
                r.states[name] = (vals, None, 0)
    else:
        for name, _ in names:
            key = opt["state_keys"].get(fqn, {}).get(name)
            if key is None:
                continue
            smd = src.dcp_md.state_dict_metadata[key]
            vals = torch.empty(L, dtype=smd.properties.dtype, device=device)
            chunked(key, tuple(smd.size), smd.properties.dtype).add_run(gs, vals)
            r.states[name] = (vals, None, 0)
    return r


def _fp32_state(r: _SegRead, name: str, kind: str) -> Optional[torch.Tensor]:
    ent = r.states.get(name)
    if ent is None:
        return None
    vals, sc, Gs = ent
    if sc is None:
        return vals.float()
    fn = nx.dequantize_signed if kind == "signed" else nx.dequantize_sqrt
    return fn(vals, sc, Gs, r.gs % Gs)


@dataclass
class PlannedLoad:
    """Everything :func:`plan_load` prepared and the install step of ``load()`` consumes, once
    DCP has filled ``targets`` and ``sd``."""

    src: Source
    view: View
    client: Any  # the optimizer (Flash or torch.optim), or None
    targets: Dict[str, Chunked]  # DCP key -> the local buffers it is read into
    sd: Dict[str, Any]  # byte entries (lr scheduler, RNG, extra, torch param groups), filled by the read
    installs: List[Callable[[], None]]  # per Flash optimizer tensor: copy params, install its state
    model_copies: List[tuple]  # (destination tensor, _SegRead) of params/buffers outside the optimizer
    torch_target: bool  # the optimizer is a plain torch.optim one
    torch_entries: List[dict]  # its reads (_plan_torch_target)
    saved_step: Callable[[str], int]  # fqn -> the step count the checkpoint holds for it
    group_byte_keys: List[tuple]  # (group index, hyper name, key) of a torch source's param groups
    lr_scheduler: Any
    restore_rng: bool
    exact: bool  # no numeric conversion (the state loads bit for bit)


def plan_load(src: Source, view: View, client, lr_scheduler, restore_rng: bool, exact: bool) -> PlannedLoad:
    """Allocate the destination buffers and list every read (``exact``: the checkpoint's numeric
    config is the optimizer's, so state is read straight into place). Raises before any
    collective starts; nothing of the model or optimizer is modified."""
    targets: Dict[str, Chunked] = {}
    sd: Dict[str, Any] = {k: None for k in src.byte_keys.values()}
    flash = isinstance(client, FlashOptimizer)
    torch_target = client is not None and not flash
    installs = []  # run, in order, after every read succeeded

    def chunked(key, shape, dtype) -> Chunked:
        ch = targets.get(key)
        if ch is None:
            ch = targets[key] = Chunked(tuple(shape), dtype)
        return ch

    # ---- torch.optim checkpoint as source: step counters and param groups
    step_bufs: Dict[str, torch.Tensor] = {}
    group_byte_keys = []
    if src.kind == "torch" and src.optimizer is not None and client is not None:
        for gi, kv in src.optimizer["group_keys"].items():
            for k, key in kv.items():
                sd[key] = None
                group_byte_keys.append((gi, k, key))
        for fqn, key in src.optimizer["step_keys"].items():
            if fqn in view.params:
                buf = torch.zeros((), dtype=src.dcp_md.state_dict_metadata[key].properties.dtype)
                chunked(key, (), buf.dtype).add_whole(buf)
                step_bufs[fqn] = buf

    def saved_step(fqn: str) -> int:
        if src.kind == "flash":
            return int(((src.optimizer or {}).get("steps") or {}).get(fqn, 0))
        b = step_bufs.get(fqn)
        return int(b.item()) if b is not None else 0

    # ---- Flash target: every optimizer tensor, segment by segment
    opt_tensor_ids = set()
    if flash:
        G = client.config.group_size
        for ti in view.tensors:
            opt_tensor_ids.add(id(ti.tensor))
            dev = ti.local.device
            names = view.state_names[: n_state_slots(client, client.param_groups[ti.group])]
            new = allocate_state(ti.layout, client.family, len(names), dev)
            pstage, seg_reads = [], []
            # one staging buffer per tensor, sliced per segment: the runs of consecutive rows of a
            # column shard then lie back to back and are read as one box (Chunked.add_run)
            pall = torch.empty(ti.local.numel(), dtype=ti.local.dtype, device=dev) if exact else None
            for si in ti.segs:
                ls, L, gs = si.seg.local_start, si.seg.length, si.seg.global_start
                pd = src.params[si.fqn]
                shape = tuple(pd["shape"])
                if exact:  # read straight into the new state; params into staging
                    pbuf = pall[ls : ls + L]
                    chunked(pd["key"], shape, ti.local.dtype).add_run(gs, pbuf)
                    pstage.append((ls, L, pbuf))
                    if "rho" in new:
                        chunked(F.rho_key(si.fqn), shape, ti.layout.rho_dtype).add_run(gs, new["rho"][ls : ls + L])
                    for name, kind in names:
                        if name not in src.optimizer["state_names"]:
                            continue
                        v = new[name]
                        chunked(F.state_key(si.fqn, name), shape, v.dtype).add_run(gs, v[ls : ls + L])
                        if ti.layout.quantized:
                            ng = si.seg.n_groups(G)
                            skey = F.scales_key(si.fqn, name)
                            chunked(skey, _saved_shape(src, skey, F.scales_shape(shape, G)), torch.bfloat16).add_run(
                                gs // G, new[name + "_scales"][si.soff : si.soff + ng]
                            )
                else:
                    seg_reads.append((si, _stage_run(targets, src, si.fqn, gs, L, dev, with_opt=True, names=names)))

            def install(ti=ti, new=new, pstage=pstage, seg_reads=seg_reads, names=names):
                for ls, L, pbuf in pstage:
                    ti.local[ls : ls + L].copy_(pbuf)
                    if src.linear_rho and "rho" in new:  # read in place in the old form
                        new["rho"][ls : ls + L] = nx.rho_from_linear(pbuf, new["rho"][ls : ls + L])
                for si, r in seg_reads:
                    _convert_into(si, r, ti, new, names, G, src.linear_rho)
                new["step"] = max([saved_step(si.fqn) for si in ti.segs] or [0])
                install_state(client, ti, new)

            installs.append(install)

    # ---- plain torch optimizer target
    torch_entries = _plan_torch_target(src, view, client, targets) if torch_target else []
    torch_param_ids = {id(e["param"]) for e in torch_entries}

    # ---- model storage that is not itself an optimizer tensor (frozen params, ZeRO replicas,
    #      model-only loads) and buffers
    rho_src = _source_rho_dtype(src)
    model_copies = []
    for fqn, pi in view.params.items():
        if id(pi.param) in opt_tensor_ids or id(pi.param) in torch_param_ids:
            continue
        optimized = src.kind == "flash" and src.meta["model"]["params"][fqn].get("optimized", False)
        for gs, run in pi.runs + pi.extra_load_runs:
            L = run.numel()
            r = _stage_run(targets, src, fqn, gs, L, run.device, with_opt=False, names=[])
            if rho_src is not None and optimized and r.param.dtype != torch.float32 and run.dtype != r.param.dtype:
                r.rho = torch.empty(L, dtype=rho_src, device=run.device)
                chunked(F.rho_key(fqn), src.params[fqn]["shape"], rho_src).add_run(gs, r.rho)
            model_copies.append((run, r))
    for fqn, buf in view.buffers.items():
        d = src.buffers.get(fqn)
        if d is None or buf.numel() == 0:
            continue
        stage = torch.empty(tuple(d["shape"]), dtype=F.dtype_from_name(d["dtype"]), device=buf.device)
        chunked(d["key"], d["shape"], stage.dtype).add_whole(stage)
        model_copies.append((buf, _SegRead(fqn, 0, buf.numel(), stage.view(-1))))

    # ---- everything we read must exist with the expected shape
    mdd = src.dcp_md.state_dict_metadata
    missing = [k for k in list(targets) + list(sd) if k not in mdd]
    if missing:
        raise F.CorruptCheckpointError(
            f"checkpoint {src.path}: its DCP metadata lacks {missing[:5]}; the checkpoint is incomplete or was "
            "written by another tool"
        )
    for k, ch in targets.items():
        smd = mdd[k]
        if isinstance(smd, BytesStorageMetadata) or tuple(smd.size) != tuple(ch.size):
            raise F.CorruptCheckpointError(
                f"checkpoint {src.path}: entry {k} has shape {list(getattr(smd, 'size', []))}, expected {list(ch.size)}"
            )
        if smd.properties.dtype != ch.dtype:
            raise F.CorruptCheckpointError(
                f"checkpoint {src.path}: entry {k} is {smd.properties.dtype}, its metadata says {ch.dtype}"
            )

    return PlannedLoad(
        src,
        view,
        client,
        targets,
        sd,
        installs,
        model_copies,
        torch_target,
        torch_entries,
        saved_step,
        group_byte_keys,
        lr_scheduler,
        restore_rng,
        exact,
    )


def install_state(client: FlashOptimizer, ti, new: dict) -> None:
    """Make ``new`` the optimizer state of ``ti.tensor`` (and let the optimizer cache its layout,
    as its own load_state_dict does)."""
    client.install_state(ti.tensor, new, client.param_groups[ti.group])


def _convert_into(si, r: _SegRead, ti, new: dict, names, G: int, linear: bool) -> None:
    """Re-encode one staged run (checkpoint format) into the optimizer's format (``linear``: its
    ρ is the linear form of format versions ≤ 2, Source.linear_rho)."""
    ls, L = si.seg.local_start, si.seg.length
    same_rho = (r.rho.dtype if r.rho is not None else None) == ti.layout.rho_dtype
    if r.param.dtype == ti.local.dtype and same_rho:
        # same master encoding: θ' and ρ carry over unchanged (ρ of an old checkpoint: its form)
        ti.local[ls : ls + L].copy_(r.param)
        if "rho" in new:
            new["rho"][ls : ls + L] = nx.rho_from_linear(r.param, r.rho) if linear else r.rho
    else:
        p, rho = _split(_master(r.param, r.rho, linear), ti.local.dtype, ti.layout.rho_dtype)
        ti.local[ls : ls + L].copy_(p)
        if "rho" in new and rho is not None:
            new["rho"][ls : ls + L] = rho
    for name, kind in names:
        ent = r.states.get(name)
        if ent is not None and ent[1] is not None and ti.layout.quantized and ent[2] == G:
            # same quantization grid: the codes and scales carry over unchanged (no re-rounding)
            new[name][ls : ls + L] = ent[0]
            new[name + "_scales"][si.soff : si.soff + si.seg.n_groups(G)] = ent[1]
            continue
        v = _fp32_state(r, name, kind)
        if v is None:
            continue
        if not ti.layout.quantized:
            new[name][ls : ls + L] = v
            continue
        fn = nx.quantize_signed if kind == "signed" else nx.quantize_sqrt
        q, s = fn(v, G, si.seg.phase(G))
        new[name][ls : ls + L] = q
        new[name + "_scales"][si.soff : si.soff + si.seg.n_groups(G)] = s


def _plan_torch_target(src: Source, view: View, client, targets) -> List[dict]:
    """Reads for a plain torch optimizer: fp32 master and fp32 states per parameter."""
    id_to_fqn = {id(pi.param): f for f, pi in view.params.items()}
    entries = []
    for gi, g in enumerate(client.param_groups):
        for p in g["params"]:
            fqn = id_to_fqn.get(id(p))
            if fqn is None:
                raise F.CheckpointError("the torch optimizer holds a tensor that is not a parameter of the model")
            spec = lay.resolve_shard(p)
            local = spec.local(p) if spec.local is not None else p
            flat = local.detach().view(-1)
            fam = {"AdamW": "adam", "Adam": "adam", "SGD": "sgd"}.get(type(client).__name__)
            names = list(FAMILIES.get(fam, ()))
            if fam == "sgd" and not g.get("momentum"):
                names = []
            reads = []
            for s in spec.segments:
                if s.length == 0:
                    continue
                r = _stage_run(targets, src, fqn, s.global_start, s.length, flat.device, with_opt=True, names=names)
                reads.append((s, r))
            entries.append(
                {"param": p, "local": local, "flat": flat, "fqn": fqn, "group": gi, "names": names, "reads": reads}
            )
    return entries
