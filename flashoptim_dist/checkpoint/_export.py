"""Export to / import from plain weights (safetensors, Hugging Face layout).

* :func:`export_checkpoint` turns a checkpoint directory into fp32 or bf16 safetensors files with
  the full-precision weights θ̂ = merge_master(θ', ρ), sharded like ``transformers`` writes them
  (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` when larger than
  ``max_shard_size``, else ``model.safetensors``). With several ranks, each rank writes its own
  files; one full tensor at a time is materialized per rank.
* :func:`export_safetensors` does the same from a live model + optimizer (it saves a temporary
  checkpoint next to the output and exports that, so no rank ever gathers the model).
* :func:`load_weights` loads plain fp32/bf16 weights (a safetensors directory/file or a dict of
  full tensors) into a possibly sharded model and initialises the Flash optimizer's ρ from them
  (``split_master``), so the fp32 values are kept exactly as far as 24/32-bit masters allow.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed.checkpoint as dcp

from .. import numerics as nx
from .._dist import rank_world
from ..optim.base import FlashOptimizer, allocate_state
from . import _comm
from . import _format as F
from ._dcp import Chunked, FlashLoadPlanner, flat_range_boxes
from ._load import install_state
from ._views import build_view, n_state_slots

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.I)


def _parse_size(s: Union[int, str]) -> int:
    if isinstance(s, int):
        return s
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {s!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _read_full(path: str, md, keys_shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """Read whole tensors (this process only) from a DCP checkpoint."""
    targets = {}
    out = {}
    for key, (shape, dtype) in keys_shapes.items():
        buf = torch.empty(shape, dtype=dtype)
        ch = Chunked(tuple(shape), dtype)
        if buf.numel() > 0:
            ch.add_whole(buf)
            targets[key] = ch
        out[key] = buf
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({}, storage_reader=dcp.FileSystemReader(path), planner=FlashLoadPlanner(targets), no_dist=True)
    except CheckpointException as e:
        raise F.CheckpointError(f"reading checkpoint {path} failed ({_comm.describe_dcp_failure(e)})") from None
    return out


def export_checkpoint(
    ckpt_path,
    out_dir,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = "5GB",
    name_map: Optional[Callable[[str], Optional[str]]] = None,
    include_buffers: bool = True,
    verify: str = "checksum",
    process_group=None,
) -> dict:
    """Write the weights of checkpoint ``ckpt_path`` as safetensors into ``out_dir``.

    ``dtype``: torch.float32 (the fp32 masters θ' + ρ) or torch.bfloat16 (rounded to nearest).
    ``name_map``: FQN → output name (None drops the tensor), e.g. to strip a wrapper prefix.
    Collective when torch.distributed is initialized (ranks share the files). Returns
    ``{"files": [...], "total_size": bytes, "tensors": n}``.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"export dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    from safetensors.torch import save_file

    from ._load import open_verified

    group = process_group
    rank, world = rank_world(group)
    ckpt_path = os.path.abspath(os.fspath(ckpt_path))
    out_dir = os.path.abspath(os.fspath(out_dir))
    st = {}

    src = open_verified(ckpt_path, verify, group)

    def prep():
        if src.kind != "flash":
            raise F.CheckpointError(f"{ckpt_path} is not a flashoptim_dist checkpoint; export needs one")
        st["src"] = src
        entries = []  # (out name, fqn, kind)
        for fqn in src.params:
            name = name_map(fqn) if name_map else fqn
            if name is not None:
                entries.append((name, fqn, "param"))
        if include_buffers:
            for fqn in src.buffers:
                name = name_map(fqn) if name_map else fqn
                if name is not None:
                    entries.append((name, fqn, "buffer"))
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            raise F.CheckpointError("name_map maps two tensors to the same name")
        return entries

    entries = _comm.run_everywhere(prep, "reading the checkpoint", group)[0]
    src = st["src"]
    limit = _parse_size(max_shard_size)
    shards: List[List[tuple]] = [[]]
    size = 0
    for e in entries:
        d = src.params[e[1]] if e[2] == "param" else src.buffers[e[1]]
        dt = (dtype if e[2] == "param" or F.dtype_from_name(d["dtype"]).is_floating_point
              else F.dtype_from_name(d["dtype"]))
        nbytes = math.prod(d["shape"]) * torch.empty((), dtype=dt).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((e, dt, nbytes))
        size += nbytes
    n = len(shards)
    fnames = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    rho_dt = {24: torch.int8, 32: torch.int16}.get(
        ((src.optimizer or {}).get("config") or {}).get("master_weight_bits"))

    def write_mine():
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        return None

    _comm.run_everywhere(write_mine, "creating the output directory", group)

    def write_files():
        for i in range(rank, n, world):
            tensors = {}
            for (name, fqn, kind), dt, _ in shards[i]:
                d = src.params[fqn] if kind == "param" else src.buffers[fqn]
                sdt = F.dtype_from_name(d["dtype"])
                want = {d["key"]: (tuple(d["shape"]), sdt)}
                has_rho = (kind == "param" and rho_dt is not None and sdt != torch.float32
                           and F.rho_key(fqn) in src.dcp_md.state_dict_metadata)
                if has_rho:
                    want[F.rho_key(fqn)] = (tuple(d["shape"]), rho_dt)
                got = _read_full(ckpt_path, src.dcp_md, want)
                t = got[d["key"]]
                if has_rho:
                    t = nx.merge_master(t.reshape(-1), got[F.rho_key(fqn)].reshape(-1), src.linear_rho).view(t.shape)
                tensors[name] = t.to(dt).contiguous() if t.is_floating_point() else t.contiguous()
            fp = os.path.join(out_dir, fnames[i])
            save_file(tensors, fp + ".tmp", metadata={"format": "pt"})
            os.replace(fp + ".tmp", fp)
        return None

    _comm.run_everywhere(write_files, "writing safetensors", group)
    total = sum(nb for s in shards for _, _, nb in s)

    def index():
        if rank == 0 and n > 1:
            wm = {e[0]: fnames[i] for i, s in enumerate(shards) for e, _, _ in s}
            F.write_json_durable(os.path.join(out_dir, "model.safetensors.index.json"),
                                 {"metadata": {"total_size": total}, "weight_map": wm}, sort_keys=True)
        return None

    _comm.run_everywhere(index, "writing the index", group)
    return {"files": fnames, "total_size": total, "tensors": len(entries)}


def export_safetensors(
    path,
    model,
    optimizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = "5GB",
    name_map: Optional[Callable[[str], Optional[str]]] = None,
    include_buffers: bool = True,
    process_group=None,
) -> dict:
    """Export the full-precision weights of a live (possibly sharded) model as safetensors.

    The fp32 value of each weight is θ' + ρ (``merge_master``) when ``optimizer`` is a Flash
    optimizer with ρ, else the parameter itself. Collective. Writes a temporary checkpoint
    ``<path>/.flashoptim-export-tmp`` (removed afterwards) so no rank gathers the model.
    """
    from ._save import save

    rank, _ = rank_world(process_group)
    path = os.path.abspath(os.fspath(path))
    tmp = os.path.join(path, ".flashoptim-export-tmp")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _comm.barrier(process_group)
    save(tmp, model, optimizer, save_rng=False, process_group=process_group)
    try:
        return export_checkpoint(tmp, path, dtype=dtype, max_shard_size=max_shard_size, name_map=name_map,
                                 include_buffers=include_buffers, verify="size", process_group=process_group)
    finally:
        _comm.barrier(process_group)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ import


class _SafetensorsSource:
    def __init__(self, source):
        self._dict = None
        self._files: Dict[str, str] = {}
        if isinstance(source, dict):
            self._dict = source
            return
        p = os.path.abspath(os.fspath(source))
        if os.path.isfile(p):
            files = [p]
        else:
            idx = os.path.join(p, "model.safetensors.index.json")
            if os.path.isfile(idx):
                with open(idx) as f:
                    wm = json.load(f)["weight_map"]
                files = sorted({os.path.join(p, v) for v in wm.values()})
            else:
                files = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".safetensors"))
        if not files:
            raise F.CheckpointError(f"no .safetensors files at {p}")
        from safetensors import safe_open

        self._open = safe_open
        self._shapes = {}
        for fp in files:
            with safe_open(fp, "pt") as f:
                for k in f.keys():
                    self._files[k] = fp
                    self._shapes[k] = tuple(f.get_slice(k).get_shape())

    def shape(self, name: str):
        if self._dict is not None:
            t = self._dict.get(name)
            return None if t is None else tuple(t.shape)
        return self._shapes.get(name)

    def read_run(self, name: str, shape, start: int, length: int) -> torch.Tensor:
        """Elements [start, start+length) of the flattened tensor, as fp32."""
        if self._dict is not None:
            return self._dict[name].reshape(-1)[start : start + length].float()
        parts = []
        with self._open(self._files[name], "pt") as f:
            sl = f.get_slice(name)
            for o, s, _ in flat_range_boxes(shape, start, start + length):
                idx = tuple(slice(a, a + b) for a, b in zip(o, s))
                parts.append(sl[idx].reshape(-1) if idx else sl[:].reshape(-1))
        return torch.cat(parts).float() if parts else torch.empty(0)


def load_weights(source, model, optimizer=None, *, name_map: Optional[Callable[[str], str]] = None,
                 strict: bool = True) -> dict:
    """Load plain fp32/bf16 weights into ``model`` (each rank reads only its runs) and, for a Flash
    ``optimizer``, set ρ so the master equals the given fp32 values as closely as the master width
    allows (``split_master``); moments start at zero. ``source``: safetensors file or directory
    (with or without index), or a dict FQN → full tensor. ``name_map``: model FQN → name in
    ``source``. Returns ``{"loaded": n, "missing": [...]}``."""
    src = _SafetensorsSource(source)
    view = build_view(model, optimizer)
    client = view.client
    missing, bad = [], []
    for fqn, pi in view.params.items():
        name = name_map(fqn) if name_map else fqn
        shp = src.shape(name)
        if shp is None:
            missing.append(fqn)
        elif tuple(shp) != tuple(pi.global_shape):
            bad.append(f"{fqn}: source {list(shp)}, model {list(pi.global_shape)}")
    if bad or (missing and strict):
        raise F.ModelMismatchError(
            "the weights do not match the model; nothing was loaded: "
            + "; ".join(bad[:6] + [f"{m} missing in the source" for m in missing[:6]])
        )
    done = set()
    with torch.no_grad():
        if isinstance(client, FlashOptimizer):
            for ti in view.tensors:
                names = view.state_names[: n_state_slots(client, client.param_groups[ti.group])]
                dev = ti.local.device
                new = allocate_state(ti.layout, client.family, len(names), dev)
                for si in ti.segs:
                    if si.fqn in missing:
                        continue
                    ls, L = si.seg.local_start, si.seg.length
                    pi = view.params[si.fqn]
                    master = src.read_run(name_map(si.fqn) if name_map else si.fqn, pi.global_shape,
                                          si.seg.global_start, L).to(dev)
                    if ti.layout.rho_dtype is not None and ti.local.dtype != torch.float32:
                        p, rho = nx.split_master(master, ti.local.dtype, ti.layout.rho_dtype)
                        new["rho"][ls : ls + L] = rho
                    else:
                        p = master.to(ti.local.dtype)
                    ti.local[ls : ls + L].copy_(p)
                install_state(client, ti, new)
                done.add(id(ti.tensor))
        for fqn, pi in view.params.items():
            if id(pi.param) in done or fqn in missing:
                continue
            for gs, run in pi.runs:
                run.copy_(src.read_run(name_map(fqn) if name_map else fqn, pi.global_shape, gs,
                                       run.numel()).to(run.dtype))
    return {"loaded": len(view.params) - len(missing), "missing": missing}
