"""Small collective helpers that also work without torch.distributed, and that turn an error on
one rank into the same error on every rank (instead of a hang)."""

from __future__ import annotations

import traceback
from typing import Any, Callable, List

import torch.distributed as dist

from ._format import CheckpointError


def active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_object(obj: Any, group=None) -> List[Any]:
    if not active(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if active(group):
        dist.barrier(group=group)


def run_everywhere(fn: Callable[[], Any], what: str, group=None) -> List[Any]:
    """Run ``fn`` on every rank and gather the results; if it raised on any rank, raise on all
    ranks (a :class:`CheckpointError` keeps its type and message)."""
    try:
        res = ("ok", fn())
    except CheckpointError as e:
        res = ("err", type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        res = ("exc", type(e).__name__, f"{e}\n{traceback.format_exc()}")
        if not active(group):
            raise
    results = all_gather_object(res, group)
    for r, item in enumerate(results):
        if item[0] == "ok":
            continue
        from . import _format

        cls = getattr(_format, item[1], None) if item[0] == "err" else None
        if cls is None or not isinstance(cls, type) or not issubclass(cls, CheckpointError):
            cls = CheckpointError
        prefix = "" if len(results) == 1 else f"[rank {r}] "
        raise cls(f"{prefix}{item[2]}" if item[0] == "err" else f"{prefix}{what} failed: {item[1]}: {item[2]}")
    return [item[1] for item in results]


def describe_dcp_failure(e: BaseException) -> str:
    """One line per failed rank from a DCP ``CheckpointException``."""
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {e}"
    parts = []
    for rank, pair in sorted(failures.items()):
        exc = pair[0] if isinstance(pair, tuple) else pair
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return "; ".join(parts)
