"""On-disk format of a flashoptim_dist checkpoint: names, versions, manifest, checksums, errors.

A checkpoint is one directory::

    PATH/
      .metadata              DCP metadata (tensor chunks and where they live)
      __<rank>_<i>.distcp    DCP data files, one per tensor (older checkpoints: one per rank)
      flashoptim.json        our metadata: format version, numeric config, model fingerprint,
                             param groups, step counters, world size and engine it was written with
      COMPLETE               written last: size and CRC-32 of every other file

The directory is written as ``.<name>.tmp-<id>`` next to PATH and renamed to PATH only after
every rank finished and COMPLETE was fsync'ed, so PATH is either absent or complete.

DCP keys (every tensor in the *global* coordinates of its parameter; see docs/design.md §3)::

    model.<fqn>                  parameter as stored (bf16/fp16/fp32), global shape
    model.<buffer fqn>           persistent buffer, as stored
    flash.<fqn>.rho              int8 (24-bit masters) / int16 (32-bit) ρ, global shape (bf16: the
                                 bit split of numerics since format version 3)
    flash.<fqn>.<state>          int8/uint8 codes (quantized) or fp32 values, global shape
    flash.<fqn>.<state>.scales   bf16, one per canonical group, in group order: (R, L/G) for a
                                 parameter of R rows of L elements with L % G == 0 (format
                                 version 2), else 1-D of ceil(numel / G) (see scales_shape)
    extra.lr_scheduler           pickled lr_scheduler.state_dict()
    extra.user                   pickled ``extra`` object
    rng.<rank>                   pickled RNG states of that rank

``model.*`` uses the key names of ``torch.distributed.checkpoint.state_dict.get_state_dict``
under a top-level "model" entry, so a plain DCP user can load the (narrow) weights with
``dcp.load({"model": get_model_state_dict(model)})``. Optimizer keys are deliberately *not*
``optim.state.*``: a plain optimizer must never read 8-bit codes as moments.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Optional

import torch

from .._errors import (  # noqa: F401  (re-exported: the checkpoint package's errors)
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ModelMismatchError,
    NumericConfigMismatchError,
    VersionMismatchError,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_FILE",
    "COMPLETE_FILE",
    "CheckpointError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "VersionMismatchError",
    "ModelMismatchError",
    "NumericConfigMismatchError",
]

FORMAT_NAME = "flashoptim_dist.checkpoint"
#: Version of the on-disk layout. Readers accept versions <= FORMAT_VERSION.
#: 2: scales of parameters whose row length is a multiple of G are stored 2-D (rows, L/G) — the
#: same values in the same order as version 1's flat vector, but a tensor-parallel column shard
#: of them is one DCP box instead of one per row. Version 1 checkpoints load unchanged (readers
#: take the scales' shape from the checkpoint's metadata).
#: 3: ρ of bf16 parameters is the bit split of numerics (the low bits of the fp32 master's
#: pattern) instead of the linear correction θ' + (ρ/N)·(u/2); versions 1-2 are converted on
#: load (numerics.rho_from_linear: int16 exactly, int8 to the nearest of its 2^-8-ULP steps).
FORMAT_VERSION = 3
META_FILE = "flashoptim.json"
COMPLETE_FILE = "COMPLETE"

MODEL_PREFIX = "model."
FLASH_PREFIX = "flash."
SCALES_SUFFIX = ".scales"
KEY_LR_SCHEDULER = "extra.lr_scheduler"
KEY_EXTRA = "extra.user"
RNG_PREFIX = "rng."

_CHUNK = 16 << 20


def model_key(fqn: str) -> str:
    return MODEL_PREFIX + fqn


def rho_key(fqn: str) -> str:
    return f"{FLASH_PREFIX}{fqn}.rho"


def state_key(fqn: str, name: str) -> str:
    return f"{FLASH_PREFIX}{fqn}.{name}"


def scales_key(fqn: str, name: str) -> str:
    return f"{FLASH_PREFIX}{fqn}.{name}{SCALES_SUFFIX}"


def scales_shape(shape, group_size: int) -> tuple:
    """Shape of a parameter's scales on disk (format version 2): ``(R, L/G)`` when the parameter
    has ≥ 2 dims and its row length L (product of the trailing dims) is a multiple of G — rows
    of the flat group vector, so that a block of rows × a range of columns (tensor parallelism)
    is one box; else the flat vector of ``ceil(numel / G)``."""
    shape = tuple(int(s) for s in shape)
    G = int(group_size)
    if len(shape) >= 2:
        L = 1
        for s in shape[1:]:
            L *= s
        if L % G == 0 and L > 0:
            return (shape[0], L // G)
    n = 1
    for s in shape:
        n *= s
    return (-(-n // G),)


def rng_key(rank: int) -> str:
    return f"{RNG_PREFIX}{rank}"


# ------------------------------------------------------------------------------- dtypes / json

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint metadata") from None


def jsonable(v):
    """Param-group values as JSON (tensors → numbers, tuples → lists)."""
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


# ---------------------------------------------------------------------------------- checksums


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            crc = zlib.crc32(b, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durable(path: str, obj, sort_keys: bool = False) -> None:
    """Write JSON to ``path`` through a temp file + fsync + rename (never a torn file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=sort_keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_body_crc(files: Dict[str, dict]) -> str:
    blob = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return f"{zlib.crc32(blob) & 0xFFFFFFFF:08x}"


def make_manifest(files: Dict[str, dict], extra: Optional[dict] = None) -> dict:
    m = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": files,
         "files_crc32": manifest_body_crc(files)}
    if extra:
        m.update(extra)
    return m


def read_manifest(path: str) -> dict:
    """Read and self-check PATH/COMPLETE; raise :class:`IncompleteCheckpointError` or
    :class:`CorruptCheckpointError` with the reason."""
    mpath = os.path.join(path, COMPLETE_FILE)
    if not os.path.isdir(path):
        hint = _sibling_hint(path)
        raise IncompleteCheckpointError(f"no checkpoint at {path}: the directory does not exist.{hint}")
    if not os.path.isfile(mpath):
        hint = _sibling_hint(path)
        raise IncompleteCheckpointError(
            f"{path} is not a complete flashoptim_dist checkpoint: {COMPLETE_FILE} is missing (the save "
            f"that wrote it was interrupted, or the directory was not written by "
            f"flashoptim_dist.checkpoint.save). Load the previous checkpoint instead.{hint}"
        )
    try:
        with open(mpath) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{mpath}: the completion manifest is unreadable ({e}); the checkpoint is damaged"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME or not isinstance(m.get("files"), dict):
        raise CorruptCheckpointError(f"{mpath}: not a flashoptim_dist completion manifest")
    if manifest_body_crc(m["files"]) != m.get("files_crc32"):
        raise CorruptCheckpointError(
            f"{mpath}: the manifest's own checksum does not match; the file was altered or damaged"
        )
    return m


def _sibling_hint(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    try:
        sibs = sorted(os.listdir(parent))
    except OSError:
        return ""
    old = [s for s in sibs if s.startswith(f".{name}.old-") and os.path.isfile(os.path.join(parent, s, COMPLETE_FILE))]
    tmp = [s for s in sibs if s.startswith(f".{name}.tmp-")]
    msg = ""
    if old:
        msg += (
            f" A complete earlier version of this checkpoint was kept at {os.path.join(parent, old[-1])} "
            f"(a save that replaced it was interrupted): rename it to {path} to use it."
        )
    if tmp:
        msg += f" Leftovers of an interrupted save ({', '.join(tmp)}) are incomplete and can be deleted."
    return msg


def verify_files(path: str, manifest: dict, names, *, checksums: bool) -> list:
    """Check the given files of ``manifest`` (size always, CRC-32 when ``checksums``); return a
    list of error strings naming the file and the problem."""
    errors = []
    files = manifest["files"]
    for name in names:
        info = files[name]
        fp = os.path.join(path, name)
        try:
            size = os.path.getsize(fp)
        except OSError:
            errors.append(f"{fp}: missing (the manifest lists it with {info['size']} bytes)")
            continue
        if size != info["size"]:
            what = "truncated" if size < info["size"] else "longer than written"
            errors.append(f"{fp}: {what}: {size} bytes on disk, {info['size']} written")
            continue
        if checksums:
            crc = file_crc32(fp)
            if crc != info["crc32"]:
                errors.append(f"{fp}: content altered: CRC-32 {crc}, written as {info['crc32']}")
    return errors
