"""SLURM's variable formats: host lists (``gpu[01-03]``), tasks per node (``2(x3),1``) and
whether this process is a task of an ``srun`` step (not the batch script)."""

from __future__ import annotations

import re
from typing import Mapping

from .base import LaunchEnvError


_BRACKET = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<rest>.*)$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list such as ``"gpu[01-03,07],login1"`` into host names.

    Supports comma-separated entries, bracketed numeric ranges with zero padding, and several
    bracket groups in one entry (``"r[1-2]n[1-2]"``). Raises :class:`LaunchEnvError` on a
    malformed list.
    """

    def split_top(s: str) -> list[str]:
        parts, depth, cur = [], 0, []
        for ch in s:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
                if depth < 0:
                    raise LaunchEnvError(f"malformed SLURM host list {hostlist!r}: unmatched ']'")
            if ch == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        if depth != 0:
            raise LaunchEnvError(f"malformed SLURM host list {hostlist!r}: unmatched '['")
        parts.append("".join(cur))
        return [p for p in (x.strip() for x in parts) if p]

    def expand_one(entry: str) -> list[str]:
        m = _BRACKET.match(entry)
        if not m:
            return [entry]
        out = []
        for piece in m.group("ranges").split(","):
            if "-" in piece:
                lo, hi = piece.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                    raise LaunchEnvError(f"malformed range {piece!r} in SLURM host list {hostlist!r}")
                width = len(lo)
                numbers = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
            else:
                if not piece.isdigit():
                    raise LaunchEnvError(f"malformed range {piece!r} in SLURM host list {hostlist!r}")
                numbers = [piece]
            for num in numbers:
                out.extend(expand_one(m.group("prefix") + num + m.group("rest")))
        return out

    hosts: list[str] = []
    for entry in split_top(hostlist):
        hosts.extend(expand_one(entry))
    return hosts


def _tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's ``"2(x3),1"`` tasks-per-node format into ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise LaunchEnvError(f"cannot parse SLURM tasks-per-node value {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _slurm_in_step(environ: Mapping[str, str]) -> bool:
    # SLURM_STEP_ID is set for srun steps; the batch script itself runs as the "batch" step
    # (SLURM_STEP_ID unset, or 4294967294 = SLURM_BATCH_SCRIPT) and is a single process even
    # when the allocation has many tasks.
    if "SLURM_PROCID" not in environ:
        return False
    step = environ.get("SLURM_STEP_ID")
    if step is None or step == "":
        return False
    return step not in ("4294967294", "4294967293", "batch", "extern")
