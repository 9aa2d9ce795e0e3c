"""Map any launcher's environment to one description of this process's place in the job.

Every launcher tells a process who it is through environment variables, each in its own
dialect. This module reads them all and returns one :class:`LaunchEnv`:

=================  ==========================================================================
launcher           variables read (first match wins, in this order)
=================  ==========================================================================
``torchrun``       ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
                   ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (``TORCHELASTIC_RUN_ID`` set)
``deepspeed``      the same names plus ``LOCAL_SIZE`` / ``CROSS_RANK`` (the deepspeed launcher)
``env``            ``RANK`` and ``WORLD_SIZE`` set by anything else (a hand-written script)
``openmpi``        ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK`` / ``_LOCAL_SIZE``
``mpich``          ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
``slurm``          ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``),
                   ``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_NODEID``,
                   ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``
``none``           nothing found: one process, rank 0 of 1
=================  ==========================================================================

The rendezvous address:

* torchrun / deepspeed / env: ``MASTER_ADDR`` / ``MASTER_PORT`` as given.
* SLURM: ``MASTER_ADDR`` if set, else the first host of the step's node list (expanded here,
  no ``scontrol`` needed); ``MASTER_PORT`` if set, else ``12000 + SLURM_JOB_ID % 20000`` so that
  two jobs sharing a node do not collide.
* MPI: ``MASTER_ADDR`` must be set explicitly (``mpirun -x MASTER_ADDR=...``), because the
  interface that MPI-based discovery picks (e.g. DeepSpeed's, the first address of
  ``hostname -I``) is often not one the ranks can reach. When every rank runs on one node
  (local size == world size) ``127.0.0.1`` is used. ``MASTER_PORT`` defaults to 29500.

:func:`apply_to_environ` writes the result back as the ``env://`` variables that
``torch.distributed`` and DeepSpeed read, and :func:`init_distributed` does that and starts
the process group. ``python -m flashoptim_dist.launch_env`` prints what was detected as JSON,
which is handy when debugging a launcher.

This module imports nothing heavy at import time (torch is imported only inside
:func:`init_distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = [
    "LaunchEnv",
    "LaunchEnvError",
    "detect",
    "apply_to_environ",
    "init_distributed",
    "expand_hostlist",
    "free_port",
]

DEFAULT_MASTER_PORT = 29500
#: Set by :func:`apply_to_environ` so that a later :func:`detect` reports the original launcher.
LAUNCHER_VAR = "FLASHOPTIM_DIST_LAUNCHER"


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or contradictory; the message names the fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a distributed job, independent of the launcher."""

    launcher: str
    """Which launcher was recognised: torchrun, deepspeed, env, openmpi, mpich, slurm or none."""
    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes on this node; selects the GPU."""
    local_world_size: int
    """Number of processes on this node."""
    node_rank: int
    """Index of this node, 0-based (best effort where the launcher does not say)."""
    master_addr: str
    """Host of the rendezvous (rank 0's TCP store)."""
    master_port: int
    """Port of the rendezvous."""

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    def to_dict(self) -> dict:
        """A JSON-friendly copy of the fields."""
        return dataclasses.asdict(self)


def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchEnvError(f"environment variable {name} is not set; the launcher should set it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def _port(environ: Mapping[str, str], default: int) -> int:
    port = _int(environ, "MASTER_PORT", default)
    if not 0 < port < 65536:
        raise LaunchEnvError(f"MASTER_PORT={port} is out of range; choose a port in 1..65535")
    return port


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


def detect(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read the launcher variables from ``environ`` (default ``os.environ``) into a LaunchEnv.

    Raises :class:`LaunchEnvError` naming the missing or bad variable and how to set it.
    """
    env = os.environ if environ is None else environ

    if "RANK" in env and "WORLD_SIZE" in env:
        if env.get(LAUNCHER_VAR):
            launcher = env[LAUNCHER_VAR]  # written by apply_to_environ: the launcher seen first
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", 0 if world == 1 else None)
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
        node_rank = _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", rank // max(local_world, 1)))
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchEnvError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR is not; export MASTER_ADDR=<host of rank 0>"
            )
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _port(env, DEFAULT_MASTER_PORT)
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        if "OMPI_COMM_WORLD_RANK" in env:
            launcher = "openmpi"
            rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
            local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
            local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
            node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // max(local_world, 1))
        else:
            launcher = "mpich"
            rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
            local_rank = _int(env, "MPI_LOCALRANKID", 0)
            local_world = _int(env, "MPI_LOCALNRANKS", 1)
            node_rank = rank // max(local_world, 1)
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif local_world == world:
            addr = "127.0.0.1"
        else:
            raise LaunchEnvError(
                f"{launcher}: ranks span several nodes but MASTER_ADDR is not set; pass it explicitly, "
                "e.g. `mpirun -x MASTER_ADDR=$(hostname -s) -x MASTER_PORT=29500 ...` "
                "(launch/mpirun.sh does this)"
            )
        port = _port(env, DEFAULT_MASTER_PORT)
    elif _slurm_in_step(env):
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        local_rank = _int(env, "SLURM_LOCALID", 0)
        node_rank = _int(env, "SLURM_NODEID", 0)
        per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = world
        if per_node_spec:
            counts = _tasks_per_node(per_node_spec)
            if 0 <= node_rank < len(counts):
                local_world = counts[node_rank]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_hostlist(nodelist)[0]
        else:
            raise LaunchEnvError("slurm: SLURM_STEP_NODELIST is not set; export MASTER_ADDR=<host of rank 0>")
        job_id = _int(env, "SLURM_JOB_ID", 0)
        port = _port(env, 12000 + job_id % 20000)
    else:
        launcher = "none"
        rank, world, local_rank, local_world, node_rank = 0, 1, 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", 0)  # 0: pick a free port when the process group starts

    if not 0 <= rank < world:
        raise LaunchEnvError(f"{launcher}: rank {rank} is outside world size {world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchEnvError(f"{launcher}: local rank {local_rank} is outside local world size {local_world}")
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def apply_to_environ(le: LaunchEnv, environ: Optional[dict] = None) -> LaunchEnv:
    """Write ``le`` into ``environ`` (default ``os.environ``) as the env:// variables.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE (DeepSpeed's name),
    GROUP_RANK, MASTER_ADDR, MASTER_PORT and FLASHOPTIM_DIST_LAUNCHER (the launcher's name). A port of 0 (single process without a launcher) is
    replaced by a free port; the returned LaunchEnv carries the port actually used.
    """
    env = os.environ if environ is None else environ
    if le.master_port == 0:
        le = dataclasses.replace(le, master_port=free_port(le.master_addr))
    env.update(
        RANK=str(le.rank),
        WORLD_SIZE=str(le.world_size),
        LOCAL_RANK=str(le.local_rank),
        LOCAL_WORLD_SIZE=str(le.local_world_size),
        LOCAL_SIZE=str(le.local_world_size),
        GROUP_RANK=str(le.node_rank),
        MASTER_ADDR=le.master_addr,
        MASTER_PORT=str(le.master_port),
    )
    env[LAUNCHER_VAR] = le.launcher
    return le


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> LaunchEnv:
    """Detect the launcher, export env:// variables and start the default process group.

    ``backend``: ``"auto"`` picks NCCL when CUDA is available and gloo otherwise. On CUDA the
    device ``cuda:<local_rank>`` is made current first. Idempotent: if a process group already
    exists it is left as is and the detected environment is returned.
    """
    import datetime

    import torch
    import torch.distributed as dist

    le = apply_to_environ(detect())
    if dist.is_available() and dist.is_initialized():
        return le
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise LaunchEnvError("backend 'nccl' needs CUDA; use engine.backend=gloo (or auto) on CPU")
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=le.rank,
        world_size=le.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return le


def _main(argv: list[str]) -> int:
    try:
        le = detect()
    except LaunchEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # one write() of the whole line: ranks sharing a launcher's pipe then never interleave
    # (print() writes the text and the newline separately)
    sys.stdout.write(json.dumps(le.to_dict(), sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
