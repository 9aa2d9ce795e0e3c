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

The rendezvous address (an explicit ``MASTER_ADDR`` / ``MASTER_PORT`` always wins, each on its own):

* torchrun / deepspeed / env: ``MASTER_ADDR`` / ``MASTER_PORT`` as given.
* SLURM: the first host of the step's node list (expanded here, no ``scontrol`` needed);
  port ``12000 + SLURM_JOB_ID % 20000`` so that two jobs sharing a node do not collide.
* MPI with ``mpi4py`` importable: discovered by :func:`resolve`, a collective over
  ``MPI.COMM_WORLD``. Local rank / size are the rank and size of this process's node
  (``Comm.Split_type(COMM_TYPE_SHARED)``), the node index is its node's place among the nodes.
  Rank 0 picks its address and a free port and broadcasts them: ``127.0.0.1`` when every rank
  is on one node; otherwise the IPv4 address of rank 0's interface that routes to the other
  nodes (see :func:`choose_master_addr` for why not the host name or ``hostname -I``), or the
  interface named by ``FLASHOPTIM_MASTER_IFNAME``.
* MPI without ``mpi4py``: ``127.0.0.1:29500`` when every rank is on one node, else an error
  asking for ``MASTER_ADDR`` (or for ``pip install mpi4py``).

:func:`apply_to_environ` writes the result back as the ``env://`` variables that
``torch.distributed`` and DeepSpeed read, and :func:`init_distributed` does that and starts
the process group. Outside torchrun (whose agents hold the rendezvous store already) it meets
the other ranks itself, so that the three ways a multi-node launch goes wrong fail within
``FLASHOPTIM_RDZV_TIMEOUT`` seconds (default 600, torchrun's join timeout) with the fix named:
rank 0's address cannot be reached, ranks disagree on the world size (or two claim one rank),
and, for :func:`hsdp_mesh_shape`, a node count that does not divide the ranks.

``python -m flashoptim_dist.launch_env`` prints what was detected as JSON (under MPI: after the
discovery); ``--check`` also starts the process group and meets every rank (a launch smoke test
that trains nothing); ``--wait HOST:PORT`` waits for a rendezvous endpoint (launch/torchrun.sh
runs it on the nodes that do not host torchrun's store).

This module imports nothing heavy at import time (torch is imported only where a process group
or store is made, mpi4py only by :func:`resolve` under an MPI launcher).

The code lives in :mod:`flashoptim_dist._launch` (``base``, ``slurm``, ``net``, ``mpi``,
``rendezvous``, ``hsdp``); this module keeps :func:`detect`, :func:`resolve`,
:func:`apply_to_environ`, :func:`init_distributed` and the command line, and re-exports the rest.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import sys
from typing import Mapping, Optional

if not __package__:
    # Run as a file (launch/torchrun.sh: `python .../flashoptim_dist/launch_env.py --wait`, because
    # importing the package imports torch, seconds per node). Register a bare package object for
    # the folder so that the relative imports below load the _launch modules without running
    # flashoptim_dist/__init__.py.
    import types

    _pkg = types.ModuleType("flashoptim_dist")
    _pkg.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules.setdefault("flashoptim_dist", _pkg)
    __package__ = "flashoptim_dist"

# (E402: after the file-mode set-up; F401: names re-exported from here)
from ._launch.base import (  # noqa: E402, F401
    DEFAULT_MASTER_PORT,
    DEFAULT_RDZV_TIMEOUT,
    LAUNCHER_VAR,
    MASTER_IFNAME_VAR,
    MPI_LAUNCHERS,
    MPI_PASS_RDZV,
    RDZV_TIMEOUT_VAR,
    LaunchEnv,
    LaunchEnvError,
    _int,
    _NO_MPI4PY_HINT,
    _port,
)
from ._launch.hsdp import hsdp_mesh_shape  # noqa: E402
from ._launch.mpi import _mpi_discover  # noqa: E402
from ._launch.net import choose_master_addr, free_port, wait_for_endpoint  # noqa: E402
from ._launch.rendezvous import rendezvous_store, rendezvous_timeout  # noqa: E402
from ._launch.slurm import _slurm_in_step, _tasks_per_node, expand_hostlist  # noqa: E402

__all__ = [
    "LaunchEnv",
    "LaunchEnvError",
    "detect",
    "resolve",
    "apply_to_environ",
    "init_distributed",
    "rendezvous_store",
    "wait_for_endpoint",
    "choose_master_addr",
    "hsdp_mesh_shape",
    "expand_hostlist",
    "free_port",
]


def _mpi4py_available() -> bool:
    """Whether mpi4py is installed (found without importing it: importing starts MPI)."""
    return importlib.util.find_spec("mpi4py") is not None


def detect(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read the launcher variables from ``environ`` (default ``os.environ``) into a LaunchEnv.

    Pure: reads variables only, talks to no other rank. Under an MPI launcher with mpi4py
    installed the rendezvous is left to :func:`resolve` (``needs_mpi_discovery``).
    Raises :class:`LaunchEnvError` naming the missing or bad variable and how to set it.
    """
    env = os.environ if environ is None else environ
    source = "MASTER_ADDR"

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
        else:
            launcher = "mpich"
            rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
            local_rank = _int(env, "MPI_LOCALRANKID", 0)
            local_world = _int(env, "MPI_LOCALNRANKS", 1)
        # Best effort until resolve() splits by node. Not OMPI_COMM_WORLD_NODE_RANK: that is
        # "the relative rank of this process on this node looking across ALL jobs" (Open MPI's
        # mpirun(1)), a per-node index, not the node's.
        node_rank = rank // max(local_world, 1)
        discover = _mpi4py_available()
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif discover:
            addr, source = "", "mpi4py"
        elif local_world == world:
            addr, source = "127.0.0.1", "one node: loopback"
        else:
            raise LaunchEnvError(
                f"{launcher}: ranks span several nodes but MASTER_ADDR is not set; pass it explicitly, "
                f"e.g. `{MPI_PASS_RDZV[launcher]}`, {_NO_MPI4PY_HINT} (launch/mpirun.sh does either)"
            )
        if discover and "MASTER_PORT" not in env:
            source = "mpi4py"  # rank 0 picks a free port even when the address was given
        port = _port(env, 0 if discover else DEFAULT_MASTER_PORT)
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
            addr, source = expand_hostlist(nodelist)[0], "first host of the SLURM node list"
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
        master_source=source,
    )


def resolve(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """:func:`detect`, completed: under an MPI launcher with mpi4py, the discovery.

    A collective under MPI (every rank must call it, once): local rank/size from a split of
    ``COMM_WORLD`` by node, rank 0's address and a free port broadcast to all. Elsewhere the
    same as :func:`detect`.
    """
    env = os.environ if environ is None else environ
    le = detect(env)
    if le.launcher in MPI_LAUNCHERS and LAUNCHER_VAR not in env and _mpi4py_available():
        le = _mpi_discover(le, env)
    return le


def apply_to_environ(le: LaunchEnv, environ: Optional[dict] = None) -> LaunchEnv:
    """Write ``le`` into ``environ`` (default ``os.environ``) as the env:// variables.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE (DeepSpeed's name),
    GROUP_RANK, MASTER_ADDR, MASTER_PORT and FLASHOPTIM_DIST_LAUNCHER (the launcher's name). A port
    of 0 (single process without a launcher) is replaced by a free port; the returned LaunchEnv
    carries the port actually used.
    """
    if le.needs_mpi_discovery:
        raise LaunchEnvError(
            f"{le.launcher}: the rendezvous is not discovered yet; call launch_env.resolve() on every rank "
            "(an MPI collective) instead of detect()"
        )
    env = os.environ if environ is None else environ
    if le.master_port == 0:
        if le.world_size > 1:
            raise LaunchEnvError(
                f"{le.launcher}: no MASTER_PORT for {le.world_size} ranks; export MASTER_PORT=<free port>"
            )
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


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0, le: Optional[LaunchEnv] = None) -> LaunchEnv:
    """Detect the launcher, export env:// variables and start the default process group.

    ``backend``: ``"auto"`` picks NCCL when CUDA is available and gloo otherwise. On CUDA the
    device ``cuda:<local_rank>`` is made current first. Idempotent: if a process group already
    exists it is left as is and the detected environment is returned. Under MPI every rank
    must call it (see :func:`resolve`). Outside torchrun the ranks meet at rank 0's store
    through :func:`rendezvous_store` within ``FLASHOPTIM_RDZV_TIMEOUT`` seconds;
    ``timeout_minutes`` is the collective timeout after that. ``le``: what :func:`resolve`
    returned, when the caller resolved already (MPI discovery happens once per process).
    """
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        le = detect()
        if le.needs_mpi_discovery:  # the program made the process group itself: nothing to discover
            le = dataclasses.replace(
                le,
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_port(os.environ, DEFAULT_MASTER_PORT),
                master_source="the existing process group",
            )
        return apply_to_environ(le)
    le = apply_to_environ(resolve() if le is None else le)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise LaunchEnvError("backend 'nccl' needs CUDA; use engine.backend=gloo (or auto) on CPU")
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torchrun's workers connect to the store its agents already made (TORCHELASTIC_USE_AGENT_STORE,
    # see torch/distributed/rendezvous.py _create_c10d_store): env:// does that, and the agents'
    # rendezvous already checked that every node arrived.
    if le.rank == 0 and le.master_source.startswith("mpi4py"):
        # what was discovered is what an operator needs to see when a node cannot reach it
        print(
            f"[flashoptim-dist] rendezvous {le.master_addr}:{le.master_port} ({le.master_source}); "
            f"{le.world_size} ranks, {le.local_world_size} on rank 0's node",
            flush=True,
        )
    if le.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        store = rendezvous_store(le)
        store.set_timeout(timeout)  # from here on store waits are collective waits
        dist.init_process_group(backend=backend, store=store, rank=le.rank, world_size=le.world_size, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, init_method="env://", rank=le.rank, world_size=le.world_size, timeout=timeout
        )
    return le


# ---------------------------------------------------------------------------------------------
# python -m flashoptim_dist.launch_env


def _check(le: LaunchEnv) -> dict:
    """Start the process group (gloo) and meet every rank: what ``--check`` prints."""
    import torch.distributed as dist

    init_distributed("gloo", timeout_minutes=rendezvous_timeout() / 60, le=le)
    hosts: list = [None] * le.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    dist.barrier()
    dist.destroy_process_group()
    return {**le.to_dict(), "hosts": hosts}


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m flashoptim_dist.launch_env", description="Print this process's launch environment as JSON."
    )
    ap.add_argument("--check", action="store_true", help="also start the process group and meet every rank")
    ap.add_argument("--wait", metavar="HOST:PORT", help="wait for a rendezvous endpoint (FLASHOPTIM_RDZV_TIMEOUT)")
    args = ap.parse_args(argv)
    try:
        if args.wait:
            host, _, port = args.wait.rpartition(":")
            timeout = rendezvous_timeout()
            if not wait_for_endpoint(host, int(port), timeout):
                try:
                    socket.getaddrinfo(host, None)
                    unresolved = ""
                except OSError:
                    unresolved = (
                        f" ({host} does not resolve on this node: use its IP address or a name in this node's DNS)"
                    )
                raise LaunchEnvError(
                    f"the rendezvous {host}:{port} did not answer within {timeout:g} s from host "
                    f"{socket.gethostname()}{unresolved}. "
                    f"Check that the first node was started with the same MASTER_ADDR:MASTER_PORT and that {host} "
                    f"is reachable from this node (firewall, `nc -zv {host} {port}`); set MASTER_ADDR to an address of "
                    f"the first node that every node can reach; if nodes start far apart, raise {RDZV_TIMEOUT_VAR} "
                    "(seconds)"
                )
            return 0
        le = resolve()
        out = _check(le) if args.check else le.to_dict()
    except LaunchEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # one write() of the whole line: ranks sharing a launcher's pipe then never interleave
    # (print() writes the text and the newline separately)
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
