"""DeepSpeed's CPU shared-memory allreduce segments: unlinked once every rank has mapped them."""

from __future__ import annotations

import os
import sys

SEGMENT_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


def segment_path(rank: int) -> str:
    """Name DeepSpeed gives ``rank``'s segment (``shm_initialize`` in its
    ``ops/csrc/cpu/comm/shm.cpp``: ``<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return f"{SEGMENT_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"


def release_cpu_comm_buffer() -> bool:
    """Unlink this rank's DeepSpeed CPU allreduce segment; collective on a CPU DeepSpeed job.

    On the CPU accelerator, DeepSpeed (0.19.8) gives every rank of a single-node job a ~66 MiB
    POSIX shared-memory segment and never unlinks it (its ``shared_close`` is never called), so
    each run leaves its ranks' segments in RAM (/dev/shm is tmpfs) until reboot: a few hundred
    test runs filled a 24 GiB machine and slowed everything on it to a crawl. Every rank maps
    every other rank's segment while DeepSpeed initializes its communication; after a barrier
    all have, and the names can go — the mappings stay valid until the processes exit, and then
    the kernel frees the memory. Returns whether a segment was removed. Does nothing (and no
    barrier) unless DeepSpeed is imported, its accelerator is the CPU and a process group runs.
    """
    if "deepspeed" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            return False
    except Exception:  # an accelerator that cannot even say its name: not ours to clean up
        return False
    dist.barrier()  # every rank is past DeepSpeed's shm_initialize before any name goes
    try:
        os.unlink(segment_path(dist.get_rank()))
    except FileNotFoundError:  # multi-node jobs have no segments; or already removed
        return False
    return True
