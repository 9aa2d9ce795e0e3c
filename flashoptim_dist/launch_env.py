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
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

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

DEFAULT_MASTER_PORT = 29500
#: Set by :func:`apply_to_environ` so that a later :func:`detect` reports the original launcher.
LAUNCHER_VAR = "FLASHOPTIM_DIST_LAUNCHER"
#: Seconds a rank waits for the rendezvous (rank 0's store, and every rank to arrive there).
RDZV_TIMEOUT_VAR = "FLASHOPTIM_RDZV_TIMEOUT"
#: torchrun's own default join timeout (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py):
#: long enough for a slow node to import torch from a shared file system, short enough that a
#: wrong address fails long before the 30-minute collective timeout would.
DEFAULT_RDZV_TIMEOUT = 600.0
#: Under MPI discovery: the interface(s) of rank 0 whose address is advertised (comma list).
MASTER_IFNAME_VAR = "FLASHOPTIM_MASTER_IFNAME"
MPI_LAUNCHERS = ("openmpi", "mpich")
_NO_MPI4PY_HINT = "or `pip install mpi4py` and let rank 0 broadcast them"


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
    """Host of the rendezvous (rank 0's TCP store); empty until :func:`resolve` under MPI."""
    master_port: int
    """Port of the rendezvous; 0: to be picked (a free port) before the process group starts."""
    master_source: str = ""
    """Where ``master_addr`` came from, for error messages (e.g. ``MASTER_ADDR``, ``mpi4py: ...``)."""

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def needs_mpi_discovery(self) -> bool:
        """True when :func:`resolve` still has to ask MPI (every rank must then call it)."""
        return self.master_source == "mpi4py"

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
    if not 0 <= port < 65536 or (port == 0 and "MASTER_PORT" in environ):
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
                "e.g. `mpirun -x MASTER_ADDR=<address of rank 0's node> -x MASTER_PORT=29500 ...`, "
                f"{_NO_MPI4PY_HINT} (launch/mpirun.sh does either)"
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


# ---------------------------------------------------------------------------------------------
# MPI discovery


def _interface_addresses() -> list[tuple[str, str]]:
    """``(interface, IPv4 address)`` of this host's interfaces that have one, loopback included.

    Linux: the SIOCGIFADDR ioctl per interface (one primary address each); elsewhere the
    addresses the host name resolves to, under the name ``"?"``.
    """
    out: list[tuple[str, str]] = []
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:  # no IPv4 address on this interface
                    continue
                out.append((name, socket.inet_ntoa(raw[20:24])))
    except (ImportError, OSError, AttributeError):
        pass
    if not out:
        try:
            out = [("?", a) for a in socket.gethostbyname_ex(socket.gethostname())[2]]
        except OSError:
            pass
    return out


def _route_source(dest: str) -> Optional[str]:
    """The local address the kernel would send from to reach ``dest`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _loopback(addr: str) -> bool:
    return addr.startswith("127.")


def choose_master_addr(
    peers: Sequence[Sequence[str]],
    mine: Sequence[tuple[str, str]],
    ifnames: Optional[str] = None,
    route: Callable[[str], Optional[str]] = _route_source,
) -> tuple[str, str]:
    """The address rank 0 advertises, and why; runs on rank 0 under MPI discovery.

    ``peers``: for every other node, the IPv4 addresses of its interfaces; ``mine``: rank 0's
    ``(interface, address)`` pairs; ``ifnames``: ``FLASHOPTIM_MASTER_IFNAME`` (comma list).

    * ``ifnames`` given: the first of those interfaces that has an address.
    * one node (no peers): ``127.0.0.1``.
    * otherwise the source address of rank 0's route to the other nodes (the kernel's choice
      for reaching them, so they can reach it back), by majority over the nodes. A peer
      address that rank 0 holds too (a docker0-style bridge that every node has) says nothing
      about how to reach that node and is skipped, unless the peer holds nothing else (then it
      is this very machine: two "nodes" of one host).

    Not the host name: on Debian-style hosts it often resolves to 127.0.1.1 or 127.0.0.1 on
    its own machine, which the other nodes cannot use. Not the first address of ``hostname -I``
    (DeepSpeed's MPI discovery, deepspeed/comm/comm.py ``mpi_discovery``): that is whichever
    interface was configured first, e.g. a management or container bridge the other nodes may
    not reach.
    """
    if ifnames:
        wanted = [n.strip() for n in ifnames.split(",") if n.strip()]
        for name in wanted:
            for iface, addr in mine:
                if iface == name:
                    return addr, f"interface {name} of rank 0's host ({MASTER_IFNAME_VAR})"
        have = ", ".join(f"{i}={a}" for i, a in mine) or "none"
        raise LaunchEnvError(
            f"{MASTER_IFNAME_VAR}={ifnames!r}: no such interface with an IPv4 address on rank 0's host "
            f"{socket.gethostname()} (it has: {have}); name one of those, or unset it to use the interface "
            "that routes to the other nodes"
        )
    if not peers:
        return "127.0.0.1", "one node: loopback"
    own = {a for _, a in mine}
    votes: Counter = Counter()
    for addrs in peers:
        usable = [a for a in addrs if not _loopback(a)]
        for dest in [a for a in usable if a not in own] or usable:
            src = route(dest)
            if src and not _loopback(src):
                votes[src] += 1
                break
    if votes:
        src, n = votes.most_common(1)[0]
        iface = next((i for i, a in mine if a == src), "?")
        return src, f"interface {iface} of rank 0's host, which routes to {n} of the {len(peers)} other nodes"
    for iface, addr in mine:
        if not _loopback(addr):
            return addr, f"interface {iface} of rank 0's host (no route to the other nodes' addresses was found)"
    raise LaunchEnvError(
        f"rank 0's host {socket.gethostname()} has no non-loopback IPv4 address that the other nodes could "
        "reach; set MASTER_ADDR=<address of rank 0 reachable from every node> (IPv6-only networks too)"
    )


#: Rank 0's listening socket for a port it picked during MPI discovery, handed to the TCP store
#: (``master_listen_fd``) so that nothing can take the port between choosing and using it.
_RESERVED: dict[int, socket.socket] = {}


def _reserve_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0))
    s.listen(128)
    port = s.getsockname()[1]
    _RESERVED[port] = s
    return port


def _mpi_discover(le: LaunchEnv, environ: Mapping[str, str]) -> LaunchEnv:
    """The MPI collective behind :func:`resolve`: node split, rank 0's address and port."""
    owned_by_caller = "mpi4py.MPI" in sys.modules  # the program started MPI itself: leave it running
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchEnvError(
            f"{le.launcher}: mpi4py is installed but cannot load its MPI library ({e}); reinstall it against "
            "this machine's MPI (`pip install --force-reinstall --no-binary=mpi4py mpi4py`), or set MASTER_ADDR "
            "and MASTER_PORT for every rank"
        ) from None
    comm = MPI.COMM_WORLD
    try:
        if comm.Get_size() != le.world_size or comm.Get_rank() != le.rank:
            library = MPI.Get_library_version().splitlines()[0].strip()
            raise LaunchEnvError(
                f"ranks disagree on the world size: the launcher ({le.launcher}) says rank {le.rank} of "
                f"{le.world_size}, but mpi4py's MPI ({library}) says rank {comm.Get_rank()} of {comm.Get_size()}. "
                "mpi4py was built against another MPI than the launcher that started this job; rebuild it with "
                "this launcher's mpicc on PATH (`pip install --force-reinstall --no-binary=mpi4py mpi4py`), or "
                "set MASTER_ADDR and MASTER_PORT for every rank"
            )
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        local_rank, local_world = node.Get_rank(), node.Get_size()
        leaders = comm.Split(0 if local_rank == 0 else MPI.UNDEFINED, key=comm.Get_rank())
        mine = (leaders.Get_rank(), leaders.Get_size()) if local_rank == 0 else None
        if local_rank == 0:
            leaders.Free()
        node_rank, num_nodes = node.bcast(mine, root=0)
        node.Free()
        # Every other node's leader tells rank 0 its addresses; rank 0 decides for everyone.
        info = [a for _, a in _interface_addresses()] if local_rank == 0 and node_rank != 0 else None
        peers = [p for p in comm.gather(info, root=0) or [] if p is not None]
        choice: tuple = ()
        if comm.Get_rank() == 0:
            try:
                addr, why = (le.master_addr, "MASTER_ADDR") if le.master_addr else choose_master_addr(
                    peers if num_nodes > 1 else [], _interface_addresses(), environ.get(MASTER_IFNAME_VAR))
                port = le.master_port or _reserve_port()
                choice = (addr, port, f"mpi4py: {why}", None)
            except (LaunchEnvError, OSError) as e:
                choice = ("", 0, "", f"rank 0: {e}")
        addr, port, why, error = comm.bcast(choice, root=0)
    finally:
        # Done with MPI: finalize now unless the program started it. Left to mpi4py's atexit,
        # MPI_Finalize would wait for every rank at exit, so a rank that fails later would hang
        # on ranks stuck in a collective with it instead of exiting (and mpirun ending the job).
        if not owned_by_caller and not MPI.Is_finalized():
            MPI.Finalize()
    if error:
        raise LaunchEnvError(error)
    return dataclasses.replace(
        le, local_rank=local_rank, local_world_size=local_world, node_rank=node_rank,
        master_addr=addr, master_port=port, master_source=why,
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
    if le.needs_mpi_discovery:
        raise LaunchEnvError(
            f"{le.launcher}: the rendezvous is not discovered yet; call launch_env.resolve() on every rank "
            "(an MPI collective) instead of detect()"
        )
    env = os.environ if environ is None else environ
    if le.master_port == 0:
        if le.world_size > 1:
            raise LaunchEnvError(f"{le.launcher}: no MASTER_PORT for {le.world_size} ranks; export MASTER_PORT=<free port>")
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


# ---------------------------------------------------------------------------------------------
# Rendezvous


def rendezvous_timeout(environ: Optional[Mapping[str, str]] = None) -> float:
    """``FLASHOPTIM_RDZV_TIMEOUT`` in seconds (default 600)."""
    env = os.environ if environ is None else environ
    raw = env.get(RDZV_TIMEOUT_VAR, "")
    if raw == "":
        return DEFAULT_RDZV_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LaunchEnvError(f"{RDZV_TIMEOUT_VAR}={raw!r} is invalid: give the rendezvous timeout in seconds (> 0)")
    return value


def _unreachable(le: LaunchEnv, timeout: float, detail: str) -> LaunchEnvError:
    return LaunchEnvError(
        f"rank {le.rank} of {le.world_size} ({le.launcher}, host {socket.gethostname()}) could not reach the "
        f"rendezvous at {le.master_addr}:{le.master_port} (address from {le.master_source or 'MASTER_ADDR'}) within "
        f"{timeout:g} s: {detail}. Check that rank 0 started and that {le.master_addr}:{le.master_port} is reachable "
        f"from this node (firewall, `nc -zv {le.master_addr} {le.master_port}`); set MASTER_ADDR to an address of "
        f"rank 0's node that every node can reach (under MPI with mpi4py: {MASTER_IFNAME_VAR}=<interface>); if the "
        f"nodes merely start far apart, raise {RDZV_TIMEOUT_VAR} (seconds)"
    )


def _join(store, le: LaunchEnv, timeout: float, generation: int) -> None:
    """Every rank checks in at rank 0's store: same world size, no rank claimed twice, all arrived.

    Without this, ranks that disagree on the world size meet in gloo/NCCL and hang until the
    collective timeout (30 min by default) with nothing naming the cause.
    """
    p = f"flashoptim/join/{generation}/"
    me = json.dumps({"rank": le.rank, "world_size": le.world_size, "host": socket.gethostname(),
                     "pid": os.getpid(), "launcher": le.launcher})

    def fail(msg: str) -> LaunchEnvError:
        store.set(p + "error", msg)
        return LaunchEnvError(msg)

    if store.add(p + f"claims/{le.rank}", 1) > 1:
        other = store.get(p + f"info/{le.rank}").decode()
        raise fail(
            f"two processes claim rank {le.rank} at the rendezvous {le.master_addr}:{le.master_port}: {me} and {other}. "
            "Another job is using the same MASTER_ADDR:MASTER_PORT, or the launcher gave one RANK twice; give each "
            "job its own MASTER_PORT (unset under MPI with mpi4py or SLURM, which pick one per job)"
        )
    store.set(p + f"info/{le.rank}", me)
    if le.rank == 0:
        store.set(p + "world_size", str(le.world_size))
    else:
        world0 = int(store.get(p + "world_size"))
        if world0 != le.world_size:
            info0 = store.get(p + "info/0").decode()
            raise fail(
                f"ranks disagree on the world size: rank {le.rank} ({le.launcher}, host {socket.gethostname()}) was "
                f"started with WORLD_SIZE={le.world_size}, rank 0 with WORLD_SIZE={world0} ({info0}). Launch every "
                "node with the same number of nodes and ranks per node (torchrun: NNODES and NPROC_PER_NODE; "
                "srun: --nodes/--ntasks; mpirun: -np), or give each job its own MASTER_PORT"
            )
    store.add(p + "arrived", 1)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if store.check([p + "error"]):
            raise LaunchEnvError(f"rank {le.rank}: another rank failed the rendezvous: {store.get(p + 'error').decode()}")
        arrived = store.add(p + "arrived", 0)
        if arrived >= le.world_size:
            return
        if time.monotonic() > deadline:
            missing = [r for r in range(le.world_size) if not store.check([p + f"info/{r}"])]
            shown = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
            raise LaunchEnvError(
                f"rank {le.rank}: only {arrived} of {le.world_size} ranks reached the rendezvous at "
                f"{le.master_addr}:{le.master_port} within {timeout:g} s; missing ranks: {shown}. Check that every "
                f"node was started (and with the same world size) and that it can reach {le.master_addr}; if nodes "
                f"start far apart, raise {RDZV_TIMEOUT_VAR} (seconds)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


_generation = 0


def rendezvous_store(le: LaunchEnv, timeout: Optional[float] = None):
    """Rank 0's TCP store for ``le`` (rank 0 hosts it, the others connect), after every rank
    checked in (:func:`_join`). Raises :class:`LaunchEnvError` naming the fix when rank 0's
    address cannot be reached, its port is taken, or ranks disagree on the world size."""
    import datetime

    import torch.distributed as dist

    global _generation
    _generation += 1
    timeout = rendezvous_timeout() if timeout is None else timeout
    delta = datetime.timedelta(seconds=timeout)
    if le.rank == 0:
        held = _RESERVED.pop(le.master_port, None)
        try:
            # the store takes over the reserved socket (detach: Python must not close it)
            store = dist.TCPStore(le.master_addr, le.master_port, None, True, delta, wait_for_workers=False,
                                  multi_tenant=True, master_listen_fd=held.detach() if held else None)
        except dist.DistError as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e):
                raise LaunchEnvError(
                    f"rank 0 ({le.launcher}, host {socket.gethostname()}) cannot listen on port {le.master_port}: it is "
                    "in use, probably by another job on this node; give this job another MASTER_PORT (or leave it "
                    "unset under MPI with mpi4py, which picks a free one)"
                ) from None
            raise _unreachable(le, timeout, str(e).splitlines()[0]) from None
    else:
        try:
            store = dist.TCPStore(le.master_addr, le.master_port, None, False, delta)
        except (dist.DistError, OSError) as e:
            raise _unreachable(le, timeout, str(e).splitlines()[0]) from None
    try:
        _join(store, le, timeout, _generation)
    except dist.DistError as e:  # a store operation timed out: rank 0 went away mid-join
        raise _unreachable(le, timeout, str(e).splitlines()[0]) from None
    return store


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
            le = dataclasses.replace(le, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                     master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                     master_port=_port(os.environ, DEFAULT_MASTER_PORT),
                                     master_source="the existing process group")
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
        print(f"[flashoptim-dist] rendezvous {le.master_addr}:{le.master_port} ({le.master_source}); "
              f"{le.world_size} ranks, {le.local_world_size} on rank 0's node", flush=True)
    if le.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        store = rendezvous_store(le)
        store.set_timeout(timeout)  # from here on store waits are collective waits
        dist.init_process_group(backend=backend, store=store, rank=le.rank, world_size=le.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=le.rank, world_size=le.world_size,
                                timeout=timeout)
    return le


def wait_for_endpoint(host: str, port: int, timeout: float) -> bool:
    """Wait until ``host:port`` accepts a TCP connection; True if it did within ``timeout`` s.

    Returns at once (True) when ``host`` is an address of this machine: the store may be meant
    to start here (torchrun's c10d backend hosts it on the node that matches the endpoint).
    """
    local = {a for _, a in _interface_addresses()} | {"127.0.0.1", "localhost", "::1"}
    try:
        resolved = {ai[4][0] for ai in socket.getaddrinfo(host, None, socket.AF_INET)}
    except OSError:
        resolved = set()
    if host in local or host == socket.gethostname() or (resolved and resolved <= local) or any(_loopback(a) for a in resolved):
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# HSDP


def hsdp_mesh_shape(replicas: Union[int, str], nodes: Sequence[int]) -> tuple[int, int]:
    """``(replicas, shards)`` of an HSDP device mesh over ranks whose node indices are ``nodes``.

    ``nodes[r]``: the node rank of rank ``r`` (all-gathered). ``replicas``: an integer dividing
    the world size, or ``"nodes"``: one replica per node, sharded within it (all-reduce across
    nodes, reduce-scatter / all-gather inside a node). The mesh makes consecutive ranks one
    replica, so ``"nodes"`` needs every node to run the same number of ranks, numbered node by
    node.
    """
    world = len(nodes)
    if replicas == "nodes":
        order = sorted(set(nodes))
        counts = [nodes.count(n) for n in order]
        if len(set(counts)) != 1:
            raise LaunchEnvError(
                f"engine.replicas=nodes needs the same number of ranks on every node, but the {len(counts)} nodes "
                f"run {counts} ranks: {len(counts)} nodes do not divide the {world} ranks evenly. Start as many ranks "
                "on each node (torchrun: the same NPROC_PER_NODE everywhere; srun: --ntasks-per-node; mpirun: "
                "equal slots per host or --map-by ppr:N:node), or set engine.replicas to a divisor of "
                f"{world} ({_divisors(world)})"
            )
        per_node = counts[0]
        for r, node in enumerate(nodes):
            if order.index(node) != r // per_node:
                raise LaunchEnvError(
                    f"engine.replicas=nodes needs each node's ranks to be consecutive, but rank {r} runs on node "
                    f"{node}: place ranks node by node (srun --distribution=block, mpirun --map-by slot), or set "
                    "engine.replicas to an integer"
                )
        return len(order), per_node
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1 or world % replicas:
        raise LaunchEnvError(
            f"engine.replicas={replicas} does not divide the {world} ranks: use one of {_divisors(world)}, "
            "or 'nodes' (one replica per node)"
        )
    return replicas, world // replicas


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


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

    ap = argparse.ArgumentParser(prog="python -m flashoptim_dist.launch_env",
                                 description="Print this process's launch environment as JSON.")
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
                    unresolved = f" ({host} does not resolve on this node: use its IP address or a name in this node's DNS)"
                raise LaunchEnvError(
                    f"the rendezvous {host}:{port} did not answer within {timeout:g} s from host {socket.gethostname()}{unresolved}. "
                    f"Check that the first node was started with the same MASTER_ADDR:MASTER_PORT and that {host} "
                    f"is reachable from this node (firewall, `nc -zv {host} {port}`); set MASTER_ADDR to an address of "
                    f"the first node that every node can reach; if nodes start far apart, raise {RDZV_TIMEOUT_VAR} (seconds)"
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
