"""The main job under launch/mpirun.sh: Open MPI ranks mapped to torch.distributed (gloo on CPU)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch_helpers import EXPECTED_BYTES_PER_PARAM, LAUNCH, TINY, bytes_per_param, checkpoint_steps, clean_env, run, summary, train_losses  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("mpirun") is None,
    reason="Open MPI is not installed (mpirun missing); install it with `bash .ci/setup_system.sh` (apt-get install openmpi-bin libopenmpi-dev)",
)


def test_mpirun_two_ranks_fsdp2(tmp_path):
    out = tmp_path / "mpi"
    proc = run(
        ["bash", str(LAUNCH / "mpirun.sh"), *TINY, f"train.out_dir={out}", "train.steps=4", "train.ckpt_every=2"],
        cwd=tmp_path, env=clean_env(NP=2, MASTER_PORT=29731),
    )
    assert "engine fsdp2 x 2 ranks (openmpi)" in proc.stdout, proc.stdout
    assert "MASTER_ADDR=127.0.0.1" in proc.stderr  # pinned explicitly on the mpirun command line (set -x)
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 4
    lo, hi = EXPECTED_BYTES_PER_PARAM
    assert lo <= bytes_per_param(s) <= hi
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert checkpoint_steps(out) == [2, 4]
    # and it resumes under mpirun too
    proc = run(
        ["bash", str(LAUNCH / "mpirun.sh"), *TINY, f"train.out_dir={out}", "train.steps=5", "train.ckpt_every=0"],
        cwd=tmp_path, env=clean_env(NP=2, MASTER_PORT=29732),
    )
    assert "resumed from step 4" in proc.stdout and summary(out)["final_step"] == 5
