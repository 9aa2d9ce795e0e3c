"""Reading a checkpoint's description without loading it (used by the CLI)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Optional

from . import _format as F


def inspect_checkpoint(path, *, verify: bool = False) -> dict:
    """Describe a checkpoint: numeric config, world size and engine it was written with, bytes
    on disk by kind (params, ρ, codes, scales, other) and per parameter, and every DCP entry.

    ``verify=True`` also checks every file's size and CRC-32 (``"verified"`` in the result).
    Standard DCP checkpoints (``get_state_dict`` + ``dcp.save``) are described too (``"kind":
    "torch"``); when their optimizer state is a Flash optimizer's, ``"flash_state"`` says what it
    holds (parameters, family, state names, ρ dtype, scale layout).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.path.abspath(os.fspath(path))
    out: dict = {"path": path}
    meta = None
    if os.path.isfile(os.path.join(path, F.COMPLETE_FILE)) or not os.path.isfile(os.path.join(path, ".metadata")):
        manifest = F.read_manifest(path)
        out["kind"] = "flashoptim"
        with open(os.path.join(path, F.META_FILE)) as f:
            meta = json.load(f)
        out["format_version"] = meta.get("format_version")
        out["world_size"] = meta.get("world_size")
        out["engine"] = meta.get("engine")
        out["step"] = meta.get("step")
        out["created_unix"] = meta.get("created_unix")
        out["torch_version"] = meta.get("torch_version")
        out["flashoptim_dist_version"] = meta.get("flashoptim_dist_version")
        opt = meta.get("optimizer")
        if opt:
            out["optimizer"] = {k: opt[k] for k in ("class", "family", "config", "state_names", "param_groups")}
        out["numel"] = meta["model"]["numel"]
        out["fingerprint"] = meta["model"]["fingerprint"]
        files = manifest["files"]
        out["files"] = len(files)
        out["bytes"] = sum(v["size"] for v in files.values())
        if verify:
            errs = F.verify_files(path, manifest, sorted(files), checksums=True)
            out["verified"] = not errs
            out["errors"] = errs
    else:
        out["kind"] = "torch"
        out["bytes"] = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                           if os.path.isfile(os.path.join(path, n)))
    md = dcp.FileSystemReader(path).read_metadata()
    if out["kind"] == "torch":
        flash = flash_state_in_dcp(md)
        if flash:
            out["flash_state"] = flash
    kinds = defaultdict(int)
    entries = []
    numel = 0
    for key, smd in sorted(md.state_dict_metadata.items()):
        if not isinstance(smd, TensorStorageMetadata):
            entries.append({"key": key, "kind": "object"})
            continue
        n = math.prod(smd.size)
        nbytes = n * _itemsize(smd.properties.dtype)
        kind = _kind_of(key)
        if kind == "param":
            numel += n
        kinds[kind] += nbytes
        entries.append({"key": key, "shape": list(smd.size), "dtype": F.dtype_name(smd.properties.dtype),
                        "chunks": len(smd.chunks), "bytes": nbytes, "kind": kind})
    if "numel" not in out:
        out["numel"] = numel
    out["tensor_bytes"] = dict(kinds)
    out["bytes_per_param"] = out["bytes"] / max(out["numel"], 1)
    out["tensors"] = entries
    return out


def _optim_state_entries(md):
    """(fqn, state name, metadata) of every ``optim.state.<fqn>.<name>`` tensor of a DCP
    checkpoint written through torch's get_state_dict (nested or flattened optimizer dict: DCP
    joins both into the same key)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, smd in md.state_dict_metadata.items():
        if key.startswith("optim.state.") and isinstance(smd, TensorStorageMetadata):
            fqn, _, name = key[len("optim.state."):].rpartition(".")
            if fqn:
                yield fqn, name, smd


def flash_state_in_dcp(md) -> Optional[dict]:
    """What Flash optimizer state a standard DCP checkpoint (``get_state_dict`` + ``dcp.save``)
    holds, or None when its optimizer state has no ρ and no scales (plain ``torch.optim``)."""
    import torch

    names, params, rho_dtypes, layouts = set(), set(), set(), set()
    for fqn, name, smd in _optim_state_entries(md):
        if name == "rho" or name.endswith("_scales"):
            params.add(fqn)
        names.add(name)
        if name == "rho":
            rho_dtypes.add(F.dtype_name(smd.properties.dtype))
        if name.endswith("_scales"):
            if smd.properties.dtype == torch.int16:
                layouts.add("elementwise")  # FSDP1: the scale of each element's group, as bf16 bits
            elif len(smd.size) == 2:
                layouts.add("rows")  # (rows, K): the scales of the groups touching each row
            else:
                layouts.add("flat")
    if not params:
        return None
    family = "adam" if "exp_avg_sq" in names else "sgd" if "momentum_buffer" in names else "lion"
    return {
        "params": len(params),
        "family": family,
        "state_names": sorted(n for n in names if n != "step"),
        "rho_dtype": "/".join(sorted(rho_dtypes)) or None,
        "quantized": any(n.endswith("_scales") for n in names),
        "scales_layout": "/".join(sorted(layouts)) or None,
    }


def _itemsize(dt) -> int:
    import torch

    return torch.empty((), dtype=dt).element_size()


def _kind_of(key: str) -> str:
    if key.startswith(F.FLASH_PREFIX):
        if key.endswith(F.SCALES_SUFFIX):
            return "scales"
        if key.endswith(".rho"):
            return "rho"
        return "states"
    if key.startswith(F.MODEL_PREFIX):
        return "param"
    if key.startswith("optim.state."):
        name = key.rpartition(".")[2]
        return "rho" if name == "rho" else "scales" if name.endswith("_scales") else "states"
    return "other"


def latest_checkpoint(root) -> Optional[str]:
    """The complete checkpoint directory under ``root`` with the highest saved ``step`` (then the
    newest), or None. Directories without ``COMPLETE`` (interrupted saves) are ignored."""
    root = os.fspath(root)
    best = None
    if not os.path.isdir(root):
        return None
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(p, F.COMPLETE_FILE)):
            continue
        try:
            with open(os.path.join(p, F.META_FILE)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        step = meta.get("step")
        if step is None:
            m = re.search(r"(\d+)$", name)
            step = int(m.group(1)) if m else -1
        key = (step, meta.get("created_unix", 0.0))
        if best is None or key > best[0]:
            best = (key, p)
    return None if best is None else best[1]
