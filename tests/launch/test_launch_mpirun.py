"""The main job under launch/mpirun.sh: Open MPI ranks mapped to torch.distributed (gloo on CPU),
with the rendezvous discovered through mpi4py — on this machine, and on two emulated nodes
(tests/launch_helpers.py ``emulated_mpi_hosts``: one Open MPI daemon per "host", as on a cluster)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    EXPECTED_BYTES_PER_PARAM, LAUNCH, TINY, bytes_per_param, checkpoint_steps, clean_env, copy_checkpoint,
    emulated_mpi_hosts, run, summary, train_losses,
)

pytestmark = pytest.mark.skipif(
    shutil.which("mpirun") is None,
    reason=("Open MPI is not installed (mpirun missing); install it with `bash .ci/setup_system.sh` "
            "(apt-get install openmpi-bin libopenmpi-dev)"),
)


def test_mpirun_two_ranks_fsdp2(tmp_path):
    pytest.importorskip("mpi4py")
    out = tmp_path / "mpi"
    proc = run(
        ["bash", str(LAUNCH / "mpirun.sh"), *TINY, f"train.out_dir={out}", "train.steps=4", "train.ckpt_every=2"],
        cwd=tmp_path, env=clean_env(NP=2),
    )
    assert "engine fsdp2 x 2 ranks (openmpi)" in proc.stdout, proc.stdout
    # nothing pinned on the command line (set -x): rank 0 picked a free port and told the others
    assert "MASTER_ADDR" not in proc.stderr and "MASTER_PORT" not in proc.stderr, proc.stderr
    assert "[flashoptim-dist] rendezvous 127.0.0.1:" in proc.stdout and "(mpi4py: one node: loopback)" in proc.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 4
    lo, hi = EXPECTED_BYTES_PER_PARAM
    assert lo <= bytes_per_param(s) <= hi
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert checkpoint_steps(out) == [2, 4]
    # and it resumes under mpirun too
    proc = run(
        ["bash", str(LAUNCH / "mpirun.sh"), *TINY, f"train.out_dir={out}", "train.steps=5", "train.ckpt_every=0"],
        cwd=tmp_path, env=clean_env(NP=2),
    )
    assert "resumed from step 4" in proc.stdout and summary(out)["final_step"] == 5


def test_mpirun_two_nodes_hsdp_then_resume_on_one_node(tmp_path):
    """launch/mpirun.sh over a two-host hostfile, no rendezvous set anywhere: MPI splits the
    ranks by node and rank 0 broadcasts a routable address (not loopback, which the other node
    could not use) and a free port; HSDP with one replica per node (the 2 x 2 mesh exists only
    if the split found 2 ranks on each of 2 nodes), checkpoints, and the run continues with
    plain FSDP2 on one node."""
    pytest.importorskip("mpi4py")
    out = tmp_path / "two_nodes"
    common = [*TINY, "data.micro_batch_size=2", "train.steps=3", "train.ckpt_every=2", "train.eval_every=0"]
    proc = run(["bash", str(LAUNCH / "mpirun.sh"), *common, f"train.out_dir={out}", "engine.replicas=nodes"],
               cwd=tmp_path, env=clean_env(**emulated_mpi_hosts(tmp_path, (2, 2))))
    assert ("engine fsdp2 x 4 ranks (openmpi)" in proc.stdout
            and "HSDP 2 replicas x 2 shards" in proc.stdout), proc.stdout[-3000:]
    assert "MASTER_ADDR" not in proc.stderr and "-np" not in proc.stderr.split()  # every slot of the hostfile
    rdzv = re.search(r"rendezvous (\S+):(\d+) \(mpi4py: interface \S+ of rank 0's host, "
                     r"which routes to 1 of the 1 other nodes\)",
                     proc.stdout)
    assert rdzv and not rdzv.group(1).startswith("127.") and int(rdzv.group(2)) != 29500, proc.stdout[-3000:]
    s = summary(out)
    assert s["world_size"] == 4 and checkpoint_steps(out) == [2, 3]
    assert [r["local_params"] * 2 for r in s["rows"]] == [s["n_params"]] * 4
    one = tmp_path / "one_node"
    copy_checkpoint(out, 2, one)
    proc = run(["bash", str(LAUNCH / "mpirun.sh"), *common, f"train.out_dir={one}"], cwd=tmp_path, env=clean_env(NP=2))
    assert ("resumed from step 2" in proc.stdout
            and "engine fsdp2 x 2 ranks (openmpi)" in proc.stdout), proc.stdout[-3000:]
    a, b = train_losses(out), train_losses(one)
    assert sorted(b) == [3] and b[3] == pytest.approx(a[3], abs=5e-3), (a, b)  # see the torchrun HSDP test
