"""Process-group and engine facts every layer asks about, without importing any engine.

A leaf: nothing here imports ``torch.distributed.tensor`` or DeepSpeed. A DTensor (or a DeepSpeed
engine) can only exist once its module was imported by whoever built it, so the checks look the
class up in ``sys.modules`` and answer ``False`` when it is absent.
"""

from __future__ import annotations

import sys
from typing import Tuple

import torch.distributed as dist

__all__ = ["rank_world", "is_dtensor", "is_deepspeed_engine"]


def rank_world(group=None) -> Tuple[int, int]:
    """``(rank, world size)`` in ``group`` (the default group when ``None``); ``(0, 1)`` without
    an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def is_dtensor(t) -> bool:
    """True when ``t`` is a ``torch.distributed.tensor.DTensor``."""
    mod = sys.modules.get("torch.distributed.tensor._api")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def is_deepspeed_engine(model) -> bool:
    """True when ``model`` is a DeepSpeed engine (``DeepSpeedEngine`` or a subclass: pipeline and
    hybrid engines), the object ``deepspeed.initialize`` returns first.

    Decided by type, not by the methods an object has: anything else that happens to define
    ``module``, ``optimizer`` or ``save_checkpoint``/``load_checkpoint`` is not an engine.
    """
    mod = sys.modules.get("deepspeed.runtime.engine")
    cls = getattr(mod, "DeepSpeedEngine", None) if mod is not None else None
    return cls is not None and isinstance(model, cls)
