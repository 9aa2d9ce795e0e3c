"""The main job under MPICH's Hydra (``mpiexec.hydra``) through launch/mpirun.sh: ranks from
``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCAL*``, the rendezvous discovered through an mpi4py built
against MPICH — on this machine, and on two emulated nodes (tests/launch_helpers.py
``emulated_hydra_hosts``: one Hydra proxy per "host", as on a cluster).

Needs MPICH and a Python whose mpi4py is built against it, named by ``FLASHOPTIM_MPICH_PYTHON``
(the recipe is in docs/launching.md, "MPICH"). CI has neither, and skips this file: its MPI is
Open MPI (tests/launch/test_launch_mpirun.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    LAUNCH, REPO, TINY, checkpoint_steps, clean_env, emulated_hydra_hosts, run, summary, train_losses,
)

HYDRA = shutil.which("mpiexec.hydra")
MPICH_PYTHON = os.environ.get("FLASHOPTIM_MPICH_PYTHON", "")

pytestmark = pytest.mark.skipif(
    HYDRA is None or not (MPICH_PYTHON and os.access(MPICH_PYTHON, os.X_OK)),
    reason=("MPICH run not configured: needs mpiexec.hydra (`apt-get install mpich`) and "
            "FLASHOPTIM_MPICH_PYTHON=<python with torch and an mpi4py built by "
            "`MPICC=mpicc.mpich pip install --no-binary=mpi4py --no-cache-dir mpi4py`> (docs/launching.md, MPICH)"),
)


def _mpich_env(**extra) -> dict:
    return clean_env(MPIRUN=HYDRA, PYTHON=MPICH_PYTHON, **extra)


def test_mpi4py_is_built_against_mpich():
    """The configured Python really is MPICH's: otherwise every test below fails on the world size."""
    proc = run([HYDRA, "-n", "2", MPICH_PYTHON, "-c",
                "from mpi4py import MPI; print(MPI.Get_library_version().split()[0], MPI.COMM_WORLD.Get_size())"],
               cwd=REPO, env=_mpich_env())
    assert proc.stdout.split() == ["MPICH", "2", "MPICH", "2"], proc.stdout


def test_hydra_two_ranks_fsdp2(tmp_path):
    out = tmp_path / "mpich"
    proc = run(["bash", str(LAUNCH / "mpirun.sh"), *TINY, f"train.out_dir={out}", "train.steps=3",
                "train.ckpt_every=2", "train.eval_every=0"],
               cwd=tmp_path, env=_mpich_env(NP=2))
    assert "engine fsdp2 x 2 ranks (mpich)" in proc.stdout, proc.stdout[-3000:]
    # Hydra's own flags (set -x), nothing pinned: rank 0 picked a free port and told the others
    assert re.search(r"exec \S*mpiexec.hydra -bind-to none -n 2 ", proc.stderr), proc.stderr[-3000:]
    assert "MASTER_ADDR" not in proc.stderr and "MASTER_PORT" not in proc.stderr and " -x " not in proc.stderr
    assert "[flashoptim-dist] rendezvous 127.0.0.1:" in proc.stdout and "(mpi4py: one node: loopback)" in proc.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 3 and sorted(train_losses(out)) == [1, 2, 3]
    assert checkpoint_steps(out) == [2, 3]


def test_hydra_two_nodes_hsdp(tmp_path):
    """Two emulated hosts x 2 ranks, no rendezvous set anywhere: MPICH's node split finds 2 nodes
    of 2 (the HSDP 2 x 2 mesh exists only then) and rank 0 broadcasts a routable address."""
    out = tmp_path / "two_nodes"
    proc = run(["bash", str(LAUNCH / "mpirun.sh"), *TINY, "data.micro_batch_size=2", "train.steps=2",
                "train.ckpt_every=0", "train.eval_every=0", f"train.out_dir={out}", "engine.replicas=nodes"],
               cwd=tmp_path, env=_mpich_env(**emulated_hydra_hosts(tmp_path, (2, 2))))
    assert ("engine fsdp2 x 4 ranks (mpich)" in proc.stdout
            and "HSDP 2 replicas x 2 shards" in proc.stdout), proc.stdout[-3000:]
    assert " -f " in proc.stderr and " -n " not in proc.stderr  # every slot of the machine file
    rdzv = re.search(r"rendezvous (\S+):(\d+) \(mpi4py: interface \S+ of rank 0's host, "
                     r"which routes to 1 of the 1 other nodes\)", proc.stdout)
    assert rdzv and not rdzv.group(1).startswith("127."), proc.stdout[-3000:]
    s = summary(out)
    assert s["world_size"] == 4 and [r["local_params"] * 2 for r in s["rows"]] == [s["n_params"]] * 4


def test_open_mpi_mpi4py_under_hydra_names_the_rebuild(tmp_path):
    """This test's own Python (CI's venv: mpi4py built against Open MPI) under mpiexec.hydra:
    each rank sees a world of 1; the error names MPICH's compiler wrapper and --no-cache-dir."""
    probe = subprocess.run(
        [sys.executable, "-c", "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
         "print(MPI.Get_library_version().split()[0])"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "Open":
        pytest.skip(f"{sys.executable} has no Open MPI mpi4py ({probe.stdout.strip() or probe.stderr[-200:]})")
    proc = run([HYDRA, "-n", "2", sys.executable, "-m", "flashoptim_dist.launch_env"], cwd=REPO,
               env=clean_env(), check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("ranks disagree on the world size: the launcher (mpich) says rank") == 2, proc.stderr
    assert "says rank 0 of 1" in proc.stderr and "e.g. mpicc.mpich on Debian/Ubuntu" in proc.stderr
    assert "--no-binary=mpi4py --no-cache-dir mpi4py" in proc.stderr
