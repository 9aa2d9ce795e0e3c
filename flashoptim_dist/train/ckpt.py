"""Training checkpoints: the trainer's only two entry points into checkpointing.

    save_train_state(ckpt_dir, step, model, optimizer, extra) -> Path
    load_latest(ckpt_dir, model, optimizer) -> step or None

Layout: ``<ckpt_dir>/step_00000100/``, one directory per saved step; the newest ``keep`` are kept.

Flash optimizers, under every engine (single, DDP, FSDP2, FSDP1 and DeepSpeed ZeRO-1/2/3), are
saved and loaded with :mod:`flashoptim_dist.checkpoint` (``save``/``load``/``latest_checkpoint``):
the canonical, compressed layout (~5.1 B/param) that loads on any number of ranks and under any
other engine, so a ZeRO-2 run resumes under FSDP2 or on another world size like any other. That
module writes atomically (a temporary directory renamed into place after its ``COMPLETE``
manifest) and verifies sizes and checksums before loading; ``extra`` goes into the checkpoint.

Torch baselines (``optim.name=AdamW`` etc., which the checkpoint module does not store) use
plain DCP (``get_state_dict``/``set_state_dict``; reshardable across world sizes and
single/DDP/FSDP2/FSDP1) or, under DeepSpeed, the engine's own ``save_checkpoint``, written into
a temporary directory and moved into place by the checkpoint module's commit step; their
completion marker is ``train_state.json``. Either way a ``step_*`` directory counts only with its
marker (``COMPLETE`` or ``train_state.json``); what interrupted saves leave behind is ignored and
removed by the next save.

The checkpoint directory must be on a file system all ranks see (as for any DCP checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .._dist import is_deepspeed_engine as _is_deepspeed
from .._dist import rank_world as _rank_world

__all__ = ["save_train_state", "load_latest", "list_checkpoints", "read_train_state", "STEP_DIR_RE"]

STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_STATE_FILE = "train_state.json"
_FORMAT = "flashoptim_dist.train.ckpt/1"
_FLASH_COMPLETE = "COMPLETE"
_FLASH_META = "flashoptim.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@contextmanager
def _quiet():
    # FSDP1's state-dict path warns about ShardedTensor deprecation and default devices on every
    # call; those say nothing to a user of the trainer.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
        yield


def _is_flash(optimizer) -> bool:
    """A Flash optimizer, directly or as the client of DeepSpeed's ZeRO optimizer."""
    from flashoptim_dist.optim.base import FlashOptimizer

    return isinstance(optimizer, FlashOptimizer) or isinstance(getattr(optimizer, "optimizer", None), FlashOptimizer)


def list_checkpoints(ckpt_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as sorted ``(step, path)`` pairs."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir() and ((p / _STATE_FILE).is_file() or (p / _FLASH_COMPLETE).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_train_state(path) -> dict:
    """Step, world size and ``extra`` of a checkpoint directory (either storage; ``extra`` of a
    Flash checkpoint is returned by ``flashoptim_dist.checkpoint.load`` and is empty here)."""
    path = Path(path)
    if (path / _STATE_FILE).is_file():
        return json.loads((path / _STATE_FILE).read_text())
    meta = json.loads((path / _FLASH_META).read_text())
    return {"format": "flashoptim_dist.checkpoint", "step": meta.get("step"), "world_size": meta.get("world_size"),
            "engine": meta.get("engine"), "extra": {}}


def dir_bytes(path) -> int:
    """Bytes of every file below ``path`` (a checkpoint's size on disk)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def save_train_state(
    ckpt_dir, step: int, model, optimizer, extra: Optional[dict] = None, keep: Optional[int] = None
) -> Path:
    """Save model + optimizer state of ``step`` atomically; collective (call on every rank).

    ``extra``: JSON-serialisable data stored with it (e.g. the config, data position).
    ``keep``: delete all but the newest ``keep`` checkpoints afterwards (None keeps all).
    Returns the final directory.
    """
    rank, world = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_dir)
    _barrier()
    if _is_flash(optimizer):
        import flashoptim_dist.checkpoint as fckpt

        fckpt.save(str(final), model, optimizer, extra=extra or {}, step=step, overwrite=True)
    else:
        _save_torch_baseline(final, step, world, model, optimizer, extra)
    if rank == 0:
        _prune(ckpt_dir, keep)
    _barrier()
    return final


def _save_torch_baseline(final: Path, step: int, world: int, model, optimizer, extra) -> None:
    """A torch baseline's checkpoint: plain DCP (or DeepSpeed's own) into a temporary directory,
    ``train_state.json`` last, then the checkpoint module's commit (fsync + rename into place)."""
    from flashoptim_dist.checkpoint import commit_directory, write_json_durable

    rank, _ = _rank_world()
    tmp = None
    if rank == 0:
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"  # removed by _remove_stale if left over
        tmp.mkdir()
    tmp = Path(_broadcast(str(tmp) if tmp is not None else None))
    if _is_deepspeed(model):
        model.save_checkpoint(str(tmp), tag="state")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        with _quiet():
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        state = {"format": _FORMAT, "step": step, "world_size": world, "time": time.time(), "extra": extra or {}}
        write_json_durable(str(tmp / _STATE_FILE), json.loads(json.dumps(state, default=str)))
        commit_directory(str(tmp), str(final))
    _barrier()


def _remove_stale(ckpt_dir: Path) -> None:
    """Delete what interrupted saves left: ``.step_*.tmp-*``/``.step_*.old-*`` (the checkpoint
    module's commit) and ``.tmp-step_*``/``.tmp-old-step_*`` (older versions of this module)."""
    for pattern in (".step_*.tmp-*", ".step_*.old-*", ".tmp-step_*", ".tmp-old-step_*"):
        for stale in ckpt_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: Optional[int]) -> None:
    if keep is not None and keep > 0:
        for _, path in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_latest(ckpt_dir, model, optimizer, extra_out: Optional[dict] = None) -> Optional[int]:
    """Load the newest complete checkpoint in ``ckpt_dir`` into ``model``/``optimizer``.

    Collective. Returns its step, or None when there is none (nothing is changed then); with
    ``extra_out`` (a dict) the ``extra`` saved with the checkpoint is put into it. A Flash
    checkpoint loads at any world size and under any engine (ZeRO included); a torch baseline's
    DCP checkpoint at any world size under single/DDP/FSDP2/FSDP1.
    """
    rank, _ = _rank_world()
    flash = _is_flash(optimizer)
    latest = None
    if rank == 0:
        found = list_checkpoints(ckpt_dir)
        if found:
            step, path = found[-1]
            kind = "flash" if (path / _FLASH_COMPLETE).is_file() else "torch"
            if kind == "flash":
                import flashoptim_dist.checkpoint as fckpt

                chosen = fckpt.latest_checkpoint(ckpt_dir)  # the highest saved step with a COMPLETE manifest
                if chosen is not None:
                    path = Path(chosen)
                    step = read_train_state(path)["step"] or step
            latest = (int(step), str(path), kind)
    latest = _broadcast(latest)
    if latest is None:
        return None
    step, path, kind = latest
    if kind == "flash":
        if not flash:
            raise RuntimeError(
                f"{path} was written by flashoptim_dist.checkpoint for a Flash optimizer, but this run's optimizer "
                f"is {type(optimizer).__name__}; resume with the same optimizer (optim.name) or start a new "
                "train.out_dir"
            )
        import flashoptim_dist.checkpoint as fckpt

        loaded = fckpt.load(path, model, optimizer)
        if extra_out is not None:
            extra_out.update(loaded.get("extra") or {})
        _barrier()
        return step
    if flash:
        raise RuntimeError(
            f"{path} was written for a torch baseline optimizer (train_state.json, plain DCP), but this run's "
            "optimizer "
            f"is a Flash optimizer; resume with the same optimizer (optim.name) or start a new train.out_dir"
        )
    if extra_out is not None:
        extra_out.update(read_train_state(path).get("extra") or {})
    if _is_deepspeed(model):
        load_path, _ = model.load_checkpoint(path, tag="state")
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        return step

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with _quiet():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _barrier()
    return step
