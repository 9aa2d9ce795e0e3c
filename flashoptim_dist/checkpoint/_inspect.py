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
    Plain DCP checkpoints (written with ``torch.optim``) are described too (``"kind": "torch"``).
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
        out["bytes"] = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    md = dcp.FileSystemReader(path).read_metadata()
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
        return "states"
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
