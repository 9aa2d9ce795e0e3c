"""Training checkpoints: the trainer's only two entry points into checkpointing.

    save_train_state(ckpt_dir, step, model, optimizer, extra) -> Path
    load_latest(ckpt_dir, model, optimizer) -> step or None

Layout: ``<ckpt_dir>/step_00000100/`` holds the model and optimizer state (DCP files) and
``train_state.json`` (step, world size, ``extra``). A checkpoint is written into
``<ckpt_dir>/.tmp-step_00000100/`` by all ranks, and rank 0 renames it to its final name only
after every rank finished writing, so after a crash a ``step_*`` directory is either complete or
absent and the previous checkpoint is intact. Leftover ``.tmp-*`` directories are ignored and
removed by the next save. The newest ``keep`` checkpoints are kept.

Storage: ``torch.distributed.checkpoint`` (DCP) with ``get_state_dict``/``set_state_dict``, so
a checkpoint written on N ranks loads on M ranks and across single/DDP/FSDP2/FSDP1 (keys are
parameter FQNs without wrapper prefixes). A DeepSpeed engine is saved with its own
``save_checkpoint``/``load_checkpoint`` into the same step directory (same rename protocol).

Flash optimizers (except under DeepSpeed, which uses its own engine checkpoint for now) are
saved with ``flashoptim_dist.checkpoint.save/load`` when that module is importable (compact canonical state, ~5.1 B/param, any world size and engine, its own atomic
rename and ``COMPLETE`` manifest; ``extra`` goes into its metadata). Torch baselines (and Flash
without that module) use plain DCP with ``get_state_dict``/``set_state_dict`` as described above.
Either way a step directory counts as complete only with its marker (``train_state.json`` or
``COMPLETE``).

The checkpoint directory must be on a file system all ranks see (as for any DCP checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch.distributed as dist

__all__ = ["save_train_state", "load_latest", "list_checkpoints", "read_train_state", "STEP_DIR_RE"]

STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_STATE_FILE = "train_state.json"
_FORMAT = "flashoptim_dist.train.ckpt/1"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _is_deepspeed(model) -> bool:
    return callable(getattr(model, "save_checkpoint", None)) and callable(getattr(model, "load_checkpoint", None))


_FLASH_COMPLETE = "COMPLETE"
_FLASH_META = "flashoptim.json"


def _flash_checkpoint(optimizer):
    """``flashoptim_dist.checkpoint`` when it can store ``optimizer`` (a Flash optimizer), else None."""
    try:
        from flashoptim_dist.optim.base import FlashOptimizer
    except ImportError:
        return None
    inner = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer wraps the client
    if not isinstance(optimizer, FlashOptimizer) and not isinstance(inner, FlashOptimizer):
        return None
    try:
        import flashoptim_dist.checkpoint as fckpt
    except ImportError:
        return None
    return fckpt


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
    """Step, world size and ``extra`` of a checkpoint directory (either storage)."""
    path = Path(path)
    if (path / _STATE_FILE).is_file():
        return json.loads((path / _STATE_FILE).read_text())
    meta = json.loads((path / _FLASH_META).read_text())
    return {"format": "flashoptim_dist.checkpoint", "step": meta.get("step"), "world_size": meta.get("world_size"),
            "extra": meta.get("extra") or {}}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_train_state(ckpt_dir, step: int, model, optimizer, extra: Optional[dict] = None, keep: Optional[int] = None) -> Path:
    """Save model + optimizer state of ``step`` atomically; collective (call on every rank).

    ``extra``: JSON-serialisable data stored with it (e.g. the config, data position).
    ``keep``: delete all but the newest ``keep`` checkpoints afterwards (None keeps all).
    Returns the final directory.
    """
    rank, world = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}"
    fckpt = _flash_checkpoint(optimizer)
    if fckpt is not None:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale(ckpt_dir)
        _barrier()
        fckpt.save(str(final), model, optimizer, extra=extra or {}, step=step, overwrite=True)
        if rank == 0:
            _prune(ckpt_dir, keep)
        _barrier()
        return final
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(ckpt_dir)
        tmp.mkdir()
    _barrier()

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
        with open(tmp / _STATE_FILE, "w") as fh:
            json.dump(state, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            old = ckpt_dir / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _prune(ckpt_dir, keep)
    _barrier()
    return final


def _remove_stale(ckpt_dir: Path) -> None:
    """Delete what interrupted saves left: ``.tmp-step_*`` (ours), ``.step_*.tmp-*`` (flashoptim_dist.checkpoint)."""
    for pattern in (".tmp-step_*", ".step_*.tmp-*", ".tmp-old-step_*"):
        for stale in ckpt_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: Optional[int]) -> None:
    if keep is not None and keep > 0:
        for _, path in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_latest(ckpt_dir, model, optimizer) -> Optional[int]:
    """Load the newest complete checkpoint in ``ckpt_dir`` into ``model``/``optimizer``.

    Collective. Returns its step, or None when there is none (nothing is changed then). Works at
    any world size for DCP checkpoints (resharding is done by DCP).
    """
    rank, _ = _rank_world()
    latest = None
    if rank == 0:
        found = list_checkpoints(ckpt_dir)
        latest = (found[-1][0], str(found[-1][1])) if found else None
    latest = _broadcast(latest)
    if latest is None:
        return None
    step, path = latest
    if (Path(path) / _FLASH_COMPLETE).is_file():
        fckpt = _flash_checkpoint(optimizer)
        if fckpt is None:
            raise RuntimeError(
                f"{path} was written by flashoptim_dist.checkpoint for a Flash optimizer, but this run's optimizer "
                f"is {type(optimizer).__name__}; resume with the same optimizer (optim.name) or start a new train.out_dir"
            )
        fckpt.load(path, model, optimizer)
        _barrier()
        return step
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
