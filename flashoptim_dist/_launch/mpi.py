"""MPI discovery: the collective over ``MPI.COMM_WORLD`` (mpi4py, imported only here) that
splits the ranks by node and broadcasts rank 0's address and a free port."""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping

from .base import MASTER_IFNAME_VAR, LaunchEnv, LaunchEnvError, mpi4py_rebuild_hint
from .net import _interface_addresses, _reserve_port, choose_master_addr


def _mpi_discover(le: LaunchEnv, environ: Mapping[str, str]) -> LaunchEnv:
    """The MPI collective behind :func:`resolve`: node split, rank 0's address and port."""
    owned_by_caller = "mpi4py.MPI" in sys.modules  # the program started MPI itself: leave it running
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchEnvError(
            f"{le.launcher}: mpi4py is installed but cannot load its MPI library ({e}); rebuild it against "
            f"this machine's MPI: {mpi4py_rebuild_hint(le.launcher)}, or set MASTER_ADDR and MASTER_PORT for "
            "every rank"
        ) from None
    comm = MPI.COMM_WORLD
    try:
        if comm.Get_size() != le.world_size or comm.Get_rank() != le.rank:
            library = " ".join(MPI.Get_library_version().splitlines()[0].split())  # MPICH's has a tab
            raise LaunchEnvError(
                f"ranks disagree on the world size: the launcher ({le.launcher}) says rank {le.rank} of "
                f"{le.world_size}, but mpi4py's MPI ({library}) says rank {comm.Get_rank()} of {comm.Get_size()}. "
                "mpi4py was built against another MPI than the launcher that started this job; rebuild it "
                f"against the launcher's MPI: {mpi4py_rebuild_hint(le.launcher)}, or set MASTER_ADDR and "
                "MASTER_PORT for every rank"
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
