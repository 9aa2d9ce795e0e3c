"""Shared helpers for the trainer/launcher tests: clean environments, tiny runs, reading outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
CONFIGS = REPO / "configs"

#: Variables of an outer launcher that must not leak into a launched test job.
_LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK", "CROSS_RANK",
    "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "FLASHOPTIM_DIST_LAUNCHER",
)
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_")

#: The optimizer the launcher tests train with (the product: FlashAdamW). Set
#: FLASHOPTIM_TEST_OPTIMIZER=AdamW to check the launch machinery against the torch baseline.
OPTIMIZER = os.environ.get("FLASHOPTIM_TEST_OPTIMIZER", "FlashAdamW")
#: Expected total bytes/param (params + grads + optimizer state) of that optimizer.
EXPECTED_BYTES_PER_PARAM = {"FlashAdamW": (7.0, 7.3), "AdamW": (16.0, 16.1)}[OPTIMIZER]

#: Overrides that make any config a few-second CPU job.
TINY = [
    f"optim.name={OPTIMIZER}",
    "model.preset=tiny",
    "data.seq_len=64",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "data.eval_sequences=8",
    "data.max_bytes=1500000",
    "optim.warmup_steps=0",
    "train.log_every=1",
    "train.progress=false",
]


def clean_env(**extra) -> dict:
    """``os.environ`` without launcher variables, with the repo importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHON"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], cwd: Path, env: Optional[dict] = None, timeout: float = 240,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure (or timeout) raise with the tail of its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-6000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-6000:]
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{out}") from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(out_dir: Path) -> list[dict]:
    """Records of ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss (log_every=1 runs)."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"}


def summary(out_dir: Path) -> dict:
    """``summary.json`` of a finished run."""
    return json.loads((Path(out_dir) / "summary.json").read_text())


def checkpoint_steps(out_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(
        int(p.name.split("_")[1]) for p in d.iterdir()
        if p.name.startswith("step_") and ((p / "train_state.json").exists() or (p / "COMPLETE").exists())
    )


def bytes_per_param(summ: dict) -> float:
    """Total bytes/param (params + grads + optimizer state) averaged over ranks."""
    rows = summ["rows"]
    n = sum(r["local_params"] for r in rows)
    return sum(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in rows) / n


def copy_checkpoint(src_out: Path, step: int, dst_out: Path) -> None:
    """Make ``dst_out`` a run directory holding only checkpoint ``step`` of ``src_out``."""
    name = f"step_{step:08d}"
    shutil.copytree(Path(src_out) / "checkpoints" / name, Path(dst_out) / "checkpoints" / name)


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once, by pid (torchrun puts each worker in its own
    session, so killing the launcher's process group would leave the workers running)."""
    import signal

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def preserved_environ():
    """Restore ``os.environ`` after an in-process run (the trainer exports RANK, MASTER_PORT, ...)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a rendezvous that the test pins)."""
    from flashoptim_dist.launch_env import free_port as _free

    return _free("")


def _fake_ssh(tmp_path: Path) -> Path:
    """A stand-in for ssh: skips options and the host name, runs the remote command on this machine."""
    agent = tmp_path / "fake_ssh"
    agent.write_text(
        "#!/usr/bin/env bash\n"
        "# ssh stand-in: skip options and the host name, run the remote command on this machine\n"
        'while [[ "${1:-}" == -* ]]; do shift; done\n'
        "shift\n"
        'exec /bin/sh -c "$*"\n'
    )
    agent.chmod(0o755)
    return agent


def emulated_hydra_hosts(tmp_path: Path, slots: tuple[int, ...] = (2, 2)) -> dict:
    """Environment for launch/mpirun.sh under MPICH's Hydra (``MPIRUN=mpiexec.hydra``) that starts
    ``len(slots)`` "nodes" on this machine: a Hydra machine file (``nodeA:2`` lines) and
    ``-launcher ssh -launcher-exec`` the ssh stand-in, so that Hydra starts one ``hydra_pmi_proxy``
    per host as on a cluster; each proxy's ranks form one node for MPI (``MPI_LOCALNRANKS``,
    ``COMM_TYPE_SHARED``). Unlike Open MPI's emulation nothing else is needed (MPICH 4.0.2, 2026-12-03).
    """
    agent = _fake_ssh(tmp_path)
    hosts = tmp_path / "hydra_hosts"
    hosts.write_text("".join(f"node{chr(65 + i)}:{n}\n" for i, n in enumerate(slots)))
    return {"HOSTFILE": str(hosts), "MPIRUN_ARGS": f"-launcher ssh -launcher-exec {agent}"}


def emulated_mpi_hosts(tmp_path: Path, slots: tuple[int, ...] = (2, 2)) -> dict:
    """Environment for launch/mpirun.sh that makes Open MPI start ``len(slots)`` "nodes" on this machine.

    The hostfile names hosts ``nodeA``, ``nodeB``, ... and ``plm_rsh_agent`` is a stand-in for
    ssh that runs the command it is given here instead of on that host: mpirun then starts one
    ``orted`` daemon per host, exactly as on a real allocation, and each daemon's ranks form one
    node for MPI (local rank/size, ``COMM_TYPE_SHARED``). Two more settings are needed only
    because both daemons share this machine: ``btl self,tcp`` (the shared-memory transport
    segfaults here between ranks of two daemons on one host; Open MPI 4.1.4 under gVisor) and
    ``PMIX_MCA_gds=hash`` (both daemons' shared-memory PMIx stores would otherwise collide:
    "PMIX ERROR ... dstore_base.c"). ``rtc_hwloc_vmhole none`` keeps each daemon from writing
    its hardware topology into a shared-memory segment placed at the "biggest hole" of its
    address space: under gVisor that hole can lie in the stack's range and ``orted`` then
    segfaults in ``hwloc_shmem_topology_write`` (seen on the CI machine 2026-12-03, exit 139;
    the daemons only lose the shared copy of the topology, nothing the ranks use).
    """
    agent = _fake_ssh(tmp_path)
    hosts = tmp_path / "hostfile"
    hosts.write_text("".join(f"node{chr(65 + i)} slots={n}\n" for i, n in enumerate(slots)))
    return {
        "HOSTFILE": str(hosts),
        "MPIRUN_ARGS": f"--oversubscribe --mca plm_rsh_agent {agent} --mca btl self,tcp --mca rtc_hwloc_vmhole none",
        "PMIX_MCA_gds": "hash",
    }
