"""A real SLURM cluster on this machine for tests: munged + slurmctld + one slurmd per node, in a
scratch directory.

Described in docs/test-machines.md, "A local SLURM cluster" (Debian's slurm-wlm and munge, run
as root). Everything the daemons write (state, spool, logs, the munge socket) stays under the
scratch directory, the ports are picked free, and the daemons are stopped by their pids, never
by name, so a test session leaves nothing running.

Several nodes: Debian's Slurm 22.05 runs several slurmd on one machine (``slurmd -N name``, one
``NodeName`` line each with its own ``Port``, spool/pid/log paths per node through ``%n``). The
nodes are called ``node1``, ``node2``, ...: names that do not resolve, with ``NodeAddr=127.0.0.1``
— as on clusters whose node names are not in DNS, a job must take the first node's address from
``scontrol show node`` (``NodeAddr``), which launch/slurm.sbatch does. One node is ``localhost``.

Use the ``slurm_cluster`` fixture (module scope, two nodes), or :class:`SlurmCluster` directly::

    with SlurmCluster(tmp_dir, nodes=2) as cluster:
        subprocess.run(["srun", "-N2", "-n2", "hostname"], env=cluster.env(), check=True)

The fixture skips (with the reason) only when the binaries are missing or the tests do not run
as root; CI installs the packages with .ci/setup_system.sh and runs as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from optional_deps import missing

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("srun", "sbatch", "sinfo", "scontrol")
MUNGE_KEY = "/etc/munge/munge.key"


def missing_requirements() -> Optional[str]:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)] + [c for c in CLIENTS if shutil.which(c) is None]
    if not shutil.which("setpriv"):
        missing.append("setpriv")
    if missing:
        return (
            f"SLURM/munge binaries not installed ({', '.join(missing)}); install them with "
            "`bash .ci/setup_system.sh` (apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd and munged); run the tests as root, as CI does"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the 'munge' user does not exist; reinstall the munge package (bash .ci/setup_system.sh)"
    if not os.path.exists(MUNGE_KEY):
        return f"{MUNGE_KEY} is missing; create it with `mungekey --create` (bash .ci/setup_system.sh does)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd with all state under ``root``; :meth:`start` / :meth:`stop`."""

    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.nodes = ["localhost"] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ------------------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        """Environment for client commands (srun, sbatch, sinfo) talking to this cluster."""
        env = dict(os.environ)
        # A SLURM job's variables leaking in from an outer allocation would confuse the clients.
        for k in list(env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                del env[k]
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _write_conf(self) -> None:
        r = self.root
        ctld_port = _free_port()
        if self.nodes == ["localhost"]:
            node_lines = [f"SlurmdPort={_free_port()}", f"NodeName=localhost CPUs={self.cpus} State=UNKNOWN"]
        else:
            node_lines = [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=flashoptimtest",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={ctld_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r}/spool_ctld",
                    f"SlurmdSpoolDir={r}/spool_d/%n",  # %n: the node name, one of each per slurmd
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd_%n.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd_%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=1",
                    "MessageTimeout=30",
                    "KillWait=5",
                    *node_lines,
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True
        )
        log.close()

    def logs(self) -> str:
        """The daemons' log files, for failure messages."""
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-3000:]
            out.append(f"--- {f.name}\n{text}")
        return "\n".join(out)

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Start the three daemons and wait until the node is idle (raises with the logs if not)."""
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        for d in ("spool_ctld", "log", "munge", *(f"spool_d/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        munge = pwd.getpwnam("munge")
        os.chown(self.root / "munge", munge.pw_uid, munge.pw_gid)
        os.chmod(self.root / "munge", 0o755)
        os.chmod(self.root, 0o755)
        for parent in self.root.parents:  # munged refuses a socket that others cannot reach
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by other users (mode {oct(parent.stat().st_mode & 0o777)}); "
                    "munged needs o+x on every directory above its socket: put the cluster elsewhere"
                )
        self._write_conf()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "/usr/sbin/munged", "-F",
                f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed", f"--key-file={MUNGE_KEY}",
            ],
        )
        deadline = time.time() + timeout
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                log = (m / "munged.log").read_text(errors="replace") if (m / "munged.log").exists() else ""
                self.stop()
                raise RuntimeError(f"munged did not start:\n{log}\n{self.logs()}")
            time.sleep(0.1)
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-c", "-f", str(self.conf)])
        time.sleep(0.5)
        for n in self.nodes:
            self._spawn(f"slurmd_{n}", ["/usr/sbin/slurmd", "-D", "-N", n, "-f", str(self.conf)])
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True)
            if out.stdout.split().count("idle") == len(self.nodes):
                return self
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = self.logs()
                self.stop()
                raise RuntimeError(f"SLURM node not idle (dead: {dead}; sinfo: {out.stdout!r} {out.stderr!r}):\n{logs}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the slurmds, slurmctld and munged by their pids
        (TERM, then KILL after 15 s)."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            # A job still running (a test that timed out) lives in slurmstepd processes, which
            # outlive slurmd: without scancel its ranks would keep running after the cluster.
            # (SLURM_CONF in env() points at this cluster only)
            subprocess.run(["scancel", "--full", "--quiet", f"--user={pwd.getpwuid(os.getuid()).pw_name}"],
                           env=self.env(), capture_output=True, timeout=30)
            deadline = time.time() + 20
            while time.time() < deadline:  # until every node is idle again: the job's processes ended
                q = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True,
                                   timeout=30)
                if q.returncode != 0 or set(q.stdout.split()) <= {"idle"}:
                    break
                time.sleep(0.5)
        for name in (*(f"slurmd_{n}" for n in self.nodes), "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (node1, node2) for the tests of one module; stopped afterwards."""
    reason = missing_requirements()
    if reason:
        missing(reason)
    # Not under pytest's tmp_path: its directories are private (0700) and munged insists that
    # every directory above its socket be searchable by all.
    root = Path(tempfile.mkdtemp(prefix="flashoptim-slurm-"))
    cluster = SlurmCluster(root, nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
