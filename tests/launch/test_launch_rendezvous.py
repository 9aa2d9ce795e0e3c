"""A multi-node launch that goes wrong fails fast, with the fix named (issue 20, item 3).

Each case starts real processes the way a launcher would (the env:// variables, or
launch/torchrun.sh) and sets FLASHOPTIM_RDZV_TIMEOUT to a few seconds: without the rendezvous
checks these cases hang until the 30-minute collective timeout or fail with a bare socket error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import LAUNCH, REPO, TINY, clean_env, free_port  # noqa: E402

CHECK = [sys.executable, "-m", "flashoptim_dist.launch_env", "--check"]


def _rank_env(rank: int, world: int, port: int, **extra) -> dict:
    return clean_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, FLASHOPTIM_RDZV_TIMEOUT=2, **extra)


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"still running after {timeout} s (hung instead of failing):\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return proc.returncode, out + err


def test_unreachable_rendezvous_names_address_and_fix():
    """The trainer as rank 1 of 2 with nobody listening at MASTER_ADDR:MASTER_PORT."""
    port = free_port()
    t0 = time.monotonic()
    rc, text = _finish(_start([sys.executable, "-m", "flashoptim_dist.train", *TINY, "train.steps=1"],
                              _rank_env(1, 2, port)))
    assert rc != 0 and time.monotonic() - t0 < 60, text[-3000:]
    assert (f"error: rank 1 of 2 (env, host {socket.gethostname()}) could not reach the rendezvous at "
            f"127.0.0.1:{port}" in text), text[-3000:]
    assert ("within 2 s" in text and "set MASTER_ADDR to an address of rank 0's node" in text
            and "FLASHOPTIM_RDZV_TIMEOUT" in text)
    assert "Traceback" not in text  # a launch problem, not a crash


def test_ranks_that_disagree_on_world_size_both_fail():
    port = free_port()
    rank0 = _start(CHECK, _rank_env(0, 2, port))
    rank1 = _start(CHECK, _rank_env(1, 3, port))
    (rc0, text0), (rc1, text1) = _finish(rank0), _finish(rank1)
    assert rc0 == 2 and rc1 == 2, (text0[-2000:], text1[-2000:])
    want = "ranks disagree on the world size: rank 1 (env, host "
    assert want in text1 and "started with WORLD_SIZE=3, rank 0 with WORLD_SIZE=2" in text1, text1[-2000:]
    assert "the same number of nodes and ranks per node" in text1
    assert "another rank failed the rendezvous: ranks disagree on the world size" in text0, text0[-2000:]


def test_a_rank_that_never_arrives_is_named():
    port = free_port()
    rc, text = _finish(_start(CHECK, _rank_env(0, 3, port)))  # ranks 1 and 2 are never started
    assert (rc == 2 and "only 1 of 3 ranks reached the rendezvous" in text
            and "missing ranks: 1, 2" in text), text[-2000:]


def test_port_taken_by_another_job():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, text = _finish(_start(CHECK, _rank_env(0, 2, port)))
    assert (rc == 2 and f"cannot listen on port {port}: it is in use" in text
            and "another MASTER_PORT" in text), text[-2000:]


def test_mpi4py_that_disagrees_with_the_launcher():
    """Open MPI variables of a 2-rank job, but mpi4py's MPI sees one process (what a mpi4py
    built against another MPI than the mpirun sees): named before any rendezvous is tried."""
    pytest.importorskip("mpi4py")
    env = clean_env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=0,
                    OMPI_COMM_WORLD_LOCAL_SIZE=1)
    rc, text = _finish(_start([sys.executable, "-m", "flashoptim_dist.launch_env"], env))
    assert rc == 2, text[-2000:]
    assert "ranks disagree on the world size: the launcher (openmpi) says rank 0 of 2, but mpi4py's MPI" in text
    assert "says rank 0 of 1" in text and "--no-binary=mpi4py" in text


def test_torchrun_node_that_cannot_reach_the_first_node(tmp_path):
    """launch/torchrun.sh on a second node whose MASTER_ADDR does not answer (198.51.100.1 is
    TEST-NET-2: never assigned to a host)."""
    env = clean_env(NNODES=2, NPROC_PER_NODE=1, MASTER_ADDR="198.51.100.1", MASTER_PORT=free_port(),
                    FLASHOPTIM_RDZV_TIMEOUT=3)
    t0 = time.monotonic()
    rc, text = _finish(_start(["bash", str(LAUNCH / "torchrun.sh"), *TINY, f"train.out_dir={tmp_path}"], env))
    assert rc != 0 and time.monotonic() - t0 < 45, text[-3000:]
    assert "the rendezvous 198.51.100.1:" in text and "did not answer within 3 s" in text, text[-3000:]
    assert "set MASTER_ADDR to an address of the first node that every node can reach" in text
