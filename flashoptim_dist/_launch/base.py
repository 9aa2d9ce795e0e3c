"""The launcher-independent description of a process (:class:`LaunchEnv`), its error type,
the variable names this project adds, and reading integer/port variables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional


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
#: How each MPI launcher passes the rendezvous to every rank: Hydra (MPICH's mpiexec) has no
#: ``-x``; it forwards the whole environment by default and takes ``-genv NAME VALUE``.
MPI_PASS_RDZV = {
    "openmpi": "mpirun -x MASTER_ADDR=<address of rank 0's node> -x MASTER_PORT=29500 ...",
    "mpich": "mpiexec -genv MASTER_ADDR <address of rank 0's node> -genv MASTER_PORT 29500 ...",
}
#: The compiler wrapper of each MPI under Debian/Ubuntu's names, where both can be installed and
#: plain ``mpicc`` is whichever ``update-alternatives`` chose (Open MPI's when both are there).
MPI_MPICC = {"openmpi": "mpicc.openmpi", "mpich": "mpicc.mpich"}


def mpi4py_rebuild_hint(launcher: str) -> str:
    """The command that rebuilds mpi4py against ``launcher``'s MPI.

    ``MPICC`` names that MPI's compiler wrapper (``mpicc`` on ``PATH`` may belong to the other
    MPI); ``--no-cache-dir`` because pip (>= 23.1, even with ``--no-binary``) would otherwise
    reinstall the wheel it built earlier, against the other MPI, from its wheel cache.
    """
    mpicc = MPI_MPICC.get(launcher, "mpicc")
    return (
        f"`MPICC=<the mpicc of the MPI that launched the job, e.g. {mpicc} on Debian/Ubuntu> "
        "pip install --force-reinstall --no-binary=mpi4py --no-cache-dir mpi4py`"
    )


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
