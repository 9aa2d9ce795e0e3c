"""The rendezvous outside torchrun: rank 0's TCP store and the check-in of every rank, which
turn the three ways a multi-node launch goes wrong into errors naming the fix."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Mapping, Optional

from .base import DEFAULT_RDZV_TIMEOUT, MASTER_IFNAME_VAR, RDZV_TIMEOUT_VAR, LaunchEnv, LaunchEnvError
from .net import _RESERVED


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
            f"two processes claim rank {le.rank} at the rendezvous {le.master_addr}:{le.master_port}: {me} and "
            f"{other}. "
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
            raise LaunchEnvError(
                f"rank {le.rank}: another rank failed the rendezvous: {store.get(p + 'error').decode()}"
            )
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
            store = dist.TCPStore(
                le.master_addr,
                le.master_port,
                None,
                True,
                delta,
                wait_for_workers=False,
                multi_tenant=True,
                master_listen_fd=held.detach() if held else None,
            )
        except dist.DistError as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e):
                raise LaunchEnvError(
                    f"rank 0 ({le.launcher}, host {socket.gethostname()}) cannot listen on port {le.master_port}: it "
                    "is "
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
