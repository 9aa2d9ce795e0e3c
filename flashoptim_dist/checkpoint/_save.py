"""save(): every rank writes its own slice of the canonical layout through DCP, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from .._dist import rank_world
from .._version import __version__
from ..canonical import canonical_run, cut_groups
from ..optim.base import STATE_FORMAT_VERSION
from . import _comm
from . import _format as F
from ._dcp import Chunked, FlashSavePlanner
from ._views import View, build_view, n_state_slots


# ------------------------------------------------------------------------------ cut groups


def _local_cut_scales(view: View) -> Dict[Tuple[str, str, int], float]:
    """(fqn, state name, group) -> this rank's scale for every group it holds only part of."""
    out: Dict[Tuple[str, str, int], float] = {}
    client = view.client
    G = client.config.group_size
    for ti in view.tensors:
        if not ti.layout.quantized:
            continue
        st = client.state.get(ti.tensor, {})
        group = client.param_groups[ti.group] if ti.group < len(client.param_groups) else {}
        names = view.state_names[: n_state_slots(client, group)] if group else view.state_names
        for si in ti.segs:
            pi = view.params[si.fqn]
            for g in cut_groups(si.seg.global_start, si.seg.length, pi.numel, G):
                for name, _ in names:
                    sc = st.get(name + "_scales")
                    v = 0.0 if sc is None else float(sc[si.soff + g - si.seg.global_start // G])
                    key = (si.fqn, name, g)
                    out[key] = max(out.get(key, 0.0), v)
    return out


# ------------------------------------------------------------------------------ state dict


def _zeros(n: int, dtype, device) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


def _build_state_dict(view: View, agreed, opt_fqns: set, lr_scheduler, extra, save_rng: bool,
                      rank: int) -> Dict[str, Any]:
    sd: Dict[str, Any] = {}

    def chunked(key, shape, dtype) -> Chunked:
        ch = sd.get(key)
        if ch is None:
            ch = sd[key] = Chunked(tuple(shape), dtype)
        elif ch.dtype != dtype:
            raise F.CheckpointError(f"{key}: pieces of different dtypes on one rank ({ch.dtype}, {dtype})")
        return ch

    client = view.client
    if view.flash:
        G = client.config.group_size
        for ti in view.tensors:
            st = client.state.get(ti.tensor, {})
            dev = ti.local.device
            group = client.param_groups[ti.group]
            names = view.state_names[: n_state_slots(client, group)]
            for si in ti.segs:
                pi = view.params[si.fqn]
                ls, L, gs = si.seg.local_start, si.seg.length, si.seg.global_start
                chunked(F.model_key(si.fqn), pi.global_shape, ti.local.dtype).add_run(gs, ti.local[ls : ls + L])
                if ti.layout.rho_dtype is not None:
                    rho = st.get("rho")
                    rho = rho[ls : ls + L] if rho is not None else _zeros(L, ti.layout.rho_dtype, dev)
                    chunked(F.rho_key(si.fqn), pi.global_shape, ti.layout.rho_dtype).add_run(gs, rho)
                for name, kind in names:
                    vals = st.get(name)
                    if not ti.layout.quantized:
                        v = vals[ls : ls + L] if vals is not None else _zeros(L, torch.float32, dev)
                        chunked(F.state_key(si.fqn, name), pi.global_shape, torch.float32).add_run(gs, v)
                        continue
                    dt = torch.int8 if kind == "signed" else torch.uint8
                    ng = si.seg.n_groups(G)
                    sc = st.get(name + "_scales")
                    sc = sc[si.soff : si.soff + ng] if sc is not None else _zeros(ng, torch.bfloat16, dev)
                    codes = vals[ls : ls + L] if vals is not None else _zeros(L, dt, dev)
                    # groups cut by this rank's boundaries: scale agreed, codes re-expressed
                    codes, sc = canonical_run(codes, sc, kind, gs, pi.numel, G,
                                              lambda g, f=si.fqn, n=name: agreed.get((f, n, g)))
                    chunked(F.state_key(si.fqn, name), pi.global_shape, dt).add_run(gs, codes)
                    # scales of the groups whose first element lies in this segment
                    g0 = gs // G
                    ga, gb = -(-gs // G), -(-(gs + L) // G)
                    if gb > ga:
                        chunked(F.scales_key(si.fqn, name), F.scales_shape(pi.global_shape, G),
                                torch.bfloat16).add_run(ga, sc[ga - g0 : gb - g0])

    for fqn, pi in view.params.items():
        if fqn in opt_fqns or pi.numel == 0:
            continue
        ch = chunked(F.model_key(fqn), pi.global_shape, pi.dtype)
        for gs, run in pi.runs:
            ch.add_run(gs, run)
    for fqn, buf in view.buffers.items():
        if buf.numel() == 0:
            continue
        chunked(F.model_key(fqn), tuple(buf.shape), buf.dtype).add_whole(buf.detach().contiguous())

    if lr_scheduler is not None:
        sd[F.KEY_LR_SCHEDULER] = lr_scheduler.state_dict()
    if extra is not None:
        sd[F.KEY_EXTRA] = extra
    if save_rng:
        sd[F.rng_key(rank)] = _rng_state()
    return sd


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


# ------------------------------------------------------------------------------ metadata


def _local_summary(view: View) -> dict:
    fp = view.fingerprint()
    blob = json.dumps(fp, sort_keys=True).encode()
    s = {"fp_hash": hashlib.sha256(blob).hexdigest(), "opt_fqns": [], "steps": {}, "group_of": {}, "cuts": {}}
    if view.flash:
        client = view.client
        for ti in view.tensors:
            st = client.state.get(ti.tensor, {})
            for si in ti.segs:
                s["opt_fqns"].append(si.fqn)
                s["group_of"][si.fqn] = ti.group
                if "step" in st:
                    s["steps"][si.fqn] = max(int(st["step"]), s["steps"].get(si.fqn, 0))
        s["cuts"] = _local_cut_scales(view)
    return s


def _merge_summaries(view: View, summaries: List[dict], group) -> dict:
    hashes = {s["fp_hash"] for s in summaries}
    if len(hashes) > 1:
        fps = _comm.all_gather_object(view.fingerprint(), group)
        diffs = []
        for r, fp in enumerate(fps[1:], start=1):
            for fqn in sorted(set(fp) | set(fps[0])):
                if fp.get(fqn) != fps[0].get(fqn):
                    diffs.append(f"{fqn}: rank 0 {fps[0].get(fqn)}, rank {r} {fp.get(fqn)}")
        raise F.CheckpointError(
            "ranks disagree on the model's global parameter shapes; an engine adapter did not describe the "
            "shards (FSDP1 needs use_orig_params=True and the flashoptim_dist adapter): " + "; ".join(diffs[:8])
        )
    steps: Dict[str, int] = {}
    conflict = []
    for s in summaries:
        for f, v in s["steps"].items():
            if f in steps and steps[f] != v:
                conflict.append(f)
            steps[f] = max(steps.get(f, 0), v)
    if conflict:
        warnings.warn(
            f"optimizer step counters differ across ranks for {sorted(set(conflict))[:5]}; saving the largest",
            stacklevel=3,
        )
    agreed: Dict[tuple, float] = {}
    for s in summaries:
        for k, v in s["cuts"].items():
            agreed[k] = max(agreed.get(k, 0.0), v)
    group_of: Dict[str, int] = {}
    for s in summaries:
        group_of.update(s["group_of"])
    opt_fqns = set()
    for s in summaries:
        opt_fqns.update(s["opt_fqns"])
    return {"steps": steps, "agreed": agreed, "group_of": group_of, "opt_fqns": opt_fqns}


def _param_groups_json(client) -> List[dict]:
    out = []
    for g in client.param_groups:
        d = {k: F.jsonable(v) for k, v in g.items() if k != "params"}
        if hasattr(client, "n_state_slots"):
            d["_n_states"] = n_state_slots(client, g)
        out.append(d)
    return out


def _meta(view: View, merged: dict, world: int, step, lr_scheduler, extra, save_rng: bool) -> dict:
    params = {}
    total = 0
    stored = {}
    for ti in view.tensors:
        for si in ti.segs:
            stored[si.fqn] = F.dtype_name(ti.local.dtype)
    for fqn, pi in view.params.items():
        params[fqn] = {
            "shape": list(pi.global_shape),
            "dtype": F.dtype_name(pi.dtype),
            "stored_dtype": stored.get(fqn, F.dtype_name(pi.dtype)),
            "optimized": fqn in merged["opt_fqns"],
        }
        total += pi.numel
    blob = json.dumps(view.fingerprint(), sort_keys=True).encode()
    meta = {
        "format": F.FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        "flashoptim_dist_version": __version__,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        "world_size": world,
        "engine": view.engine,
        "step": step,
        "model": {
            "params": params,
            "buffers": {f: {"shape": list(b.shape), "dtype": F.dtype_name(b.dtype)} for f, b in view.buffers.items()},
            "fingerprint": hashlib.sha256(blob).hexdigest(),
            "numel": total,
        },
        "optimizer": None,
        "contents": {"lr_scheduler": lr_scheduler is not None, "extra": extra is not None,
                     "rng_ranks": world if save_rng else 0},
    }
    if view.flash:
        c = view.client
        meta["optimizer"] = {
            "kind": "flash",
            "class": getattr(c, "cls_name", type(c).__name__),
            "family": c.family,
            "decoupled": bool(c.decoupled),
            "config": c.config.to_dict(),
            "state_format_version": STATE_FORMAT_VERSION,
            "state_names": [n for n, _ in view.state_names],
            "param_groups": _param_groups_json(c),
            "param_group_of": merged["group_of"],
            "steps": {f: merged["steps"].get(f, 0) for f in sorted(merged["opt_fqns"])},
        }
    return meta


# ------------------------------------------------------------------------------ save


def _prepare_dirs(path: str, overwrite: bool) -> str:
    path = os.path.abspath(path)
    parent, name = os.path.split(path.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path):
        if not overwrite:
            raise F.CheckpointError(
                f"{path} already exists; pass overwrite=True to replace it (the existing checkpoint stays "
                "intact until the new one is complete) or save to a new path"
            )
        if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, F.COMPLETE_FILE)):
            if not os.path.isfile(os.path.join(path, ".metadata")):
                raise F.CheckpointError(
                    f"{path} exists and is not a checkpoint; refusing to replace it. Choose another path."
                )
    for s in os.listdir(parent):  # leftovers of interrupted saves of this same path
        if s.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, s), ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(tmp)
    return tmp


def commit_directory(tmp: str, path: str) -> None:
    """Put the finished directory ``tmp`` at ``path`` atomically: fsync ``tmp``, move an existing
    ``path`` aside (``.<name>.old-<id>``), rename ``tmp`` to ``path``, fsync the parent, then delete
    the old one. A crash leaves either the old directory at ``path`` or the new one (plus a
    leftover to clean). Call on one rank, after every rank has written and fsync'ed its files."""
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    F.fsync_dir(tmp)
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(path, old)
    os.rename(tmp, path)
    F.fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _writer(tmp: str, thread_count: int = 1):
    """DCP's file writer, one data file per tensor.

    torch's ``FileSystemWriter`` copies each tensor of a data file to the host and keeps every
    copy alive until that file is written (``_write_files_from_queue`` collects them for its
    safetensors branch). With its default of one file per rank, a GPU rank therefore stages its
    whole share of the checkpoint in host RAM: 44 GiB for an 8B model on one H200 (2026-12-03,
    docs/PERFORMANCE.md "One GPU"), ~104 GB for the 20B one-GPU recipe on a 128 GiB host. One file
    per tensor bounds the staging by the largest tensor (times ``thread_count``). Loading reads
    the chunks through DCP's metadata, so checkpoints written either way load alike."""
    return dcp.FileSystemWriter(tmp, sync_files=True, thread_count=thread_count, single_file_per_rank=False)


def save(
    path,
    model,
    optimizer=None,
    *,
    lr_scheduler=None,
    extra: Any = None,
    step: Optional[int] = None,
    overwrite: bool = False,
    save_rng: bool = True,
    process_group=None,
    thread_count: int = 1,
) -> dict:
    """Save ``model`` and ``optimizer`` in the canonical, world-size independent layout.

    Call on every rank (collective). Each rank writes only what it holds; groups that a shard
    boundary cuts are agreed to one scale before writing. The checkpoint appears at ``path``
    only when complete (see :mod:`flashoptim_dist.checkpoint`). Returns a summary dict
    (``path``, ``bytes``, ``numel``, ``bytes_per_param``, ``world_size``, ``seconds``).

    FSDP2: units whose parameters are unsharded at the time of the call — the root after an
    evaluation forward without backward — are resharded first with the public
    ``FSDPModule.reshard()`` (no communication; the next forward gathers them again), so the
    optimizer state of every parameter is written. An optimizer tensor that cannot be matched
    to a parameter of ``model`` raises :class:`CheckpointError` naming it before anything is
    written: a save is never incomplete.
    """
    t0 = time.perf_counter()
    group = process_group
    rank, world = rank_world(group)
    path = os.path.abspath(os.fspath(path))

    def prep():
        v = build_view(model, optimizer)
        if optimizer is not None and not v.flash:
            raise F.CheckpointError(
                f"flashoptim_dist.checkpoint.save stores Flash optimizers; got {type(v.client).__name__}. Save a "
                "plain torch optimizer with torch.distributed.checkpoint (get_state_dict + dcp.save); "
                "flashoptim_dist.checkpoint.load(..., convert=True) imports such checkpoints."
            )
        return v, _local_summary(v)

    holder = {}

    def prep_store():
        holder["view"], s = prep()
        return s

    summaries = _comm.run_everywhere(prep_store, "preparing the checkpoint", group)
    view: View = holder["view"]
    merged = _merge_summaries(view, summaries, group)

    tmp = _comm.run_everywhere(lambda: _prepare_dirs(path, overwrite) if rank == 0 else None,
                               "creating the directory", group)[0]

    sd_holder = {}

    def build():
        sd_holder["sd"] = _build_state_dict(view, merged["agreed"], merged["opt_fqns"], lr_scheduler, extra,
                                            save_rng, rank)

    _comm.run_everywhere(build, "collecting tensors", group)
    writer = _writer(tmp, thread_count)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(sd_holder.pop("sd"), storage_writer=writer, planner=FlashSavePlanner(), process_group=group,
                     no_dist=not _comm.active(group))
    except CheckpointException as e:
        raise F.CheckpointError(
            f"writing checkpoint {path} failed ({_comm.describe_dcp_failure(e)}); nothing was written at {path} "
            f"(an existing checkpoint there is intact); the partial files in {tmp} are removed by the next save"
        ) from None

    def write_meta():
        if rank == 0:
            F.write_json_durable(os.path.join(tmp, F.META_FILE),
                                 _meta(view, merged, world, step, lr_scheduler, extra, save_rng))
            return sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
        return None

    files = _comm.run_everywhere(write_meta, "writing metadata", group)[0]

    def checksum():
        return {n: {"size": os.path.getsize(os.path.join(tmp, n)), "crc32": F.file_crc32(os.path.join(tmp, n))}
                for n in files[rank::world]}

    parts = _comm.run_everywhere(checksum, "checksumming", group)

    def finish():
        if rank != 0:
            return None
        allf = {}
        for p in parts:
            allf.update(p)
        F.write_json_durable(os.path.join(tmp, F.COMPLETE_FILE), F.make_manifest(allf, {"world_size": world}))
        commit_directory(tmp, path)
        return sum(v["size"] for v in allf.values())

    nbytes = _comm.run_everywhere(finish, "committing the checkpoint", group)[0]
    numel = sum(pi.numel for pi in view.params.values())
    return {
        "path": path,
        "bytes": nbytes,
        "numel": numel,
        "bytes_per_param": nbytes / max(numel, 1),
        "world_size": world,
        "seconds": time.perf_counter() - t0,
    }


def save_offline(path, views: List[View], *, overwrite: bool, stage: int, world: int, step=None,
                 lr_scheduler_state=None) -> dict:
    """Write the canonical checkpoint of several ranks' views from one process (used by the
    DeepSpeed converter, which reads every rank's files)."""
    t0 = time.perf_counter()
    path = os.path.abspath(os.fspath(path))
    summaries = [_local_summary(v) for v in views]
    merged = _merge_summaries(views[0], summaries, None)
    sd: Dict[str, Any] = {}
    for r, v in enumerate(views):
        for k, ch in _build_state_dict(v, merged["agreed"], merged["opt_fqns"], None, None, False, r).items():
            if k in sd:
                sd[k].pieces.extend(ch.pieces)
            else:
                sd[k] = ch

    class _Sched:
        def state_dict(self):
            return lr_scheduler_state

    sched = _Sched() if lr_scheduler_state is not None else None
    if sched is not None:
        sd[F.KEY_LR_SCHEDULER] = lr_scheduler_state
    tmp = _prepare_dirs(path, overwrite)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(sd, storage_writer=_writer(tmp), planner=FlashSavePlanner(),
                     no_dist=True)
    except CheckpointException as e:
        raise F.CheckpointError(
            f"writing {path} failed ({_comm.describe_dcp_failure(e)}); nothing was written at {path}"
        ) from None
    meta = _meta(views[0], merged, world, step, sched, None, False)
    meta["engine"] = f"zero{stage} (converted from a DeepSpeed checkpoint)"
    F.write_json_durable(os.path.join(tmp, F.META_FILE), meta)
    files = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
    allf = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "crc32": F.file_crc32(os.path.join(tmp, n))}
            for n in files}
    F.write_json_durable(os.path.join(tmp, F.COMPLETE_FILE), F.make_manifest(allf, {"world_size": world}))
    commit_directory(tmp, path)
    nbytes = sum(v["size"] for v in allf.values())
    numel = sum(pi.numel for pi in views[0].params.values())
    return {"path": path, "bytes": nbytes, "numel": numel, "bytes_per_param": nbytes / max(numel, 1),
            "world_size": world, "stage": stage, "seconds": time.perf_counter() - t0}
