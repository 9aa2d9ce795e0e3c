"""The main job on a real one-node SLURM cluster (munge + slurmctld + slurmd started by the test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch_helpers import EXPECTED_BYTES_PER_PARAM, LAUNCH, REPO, TINY, bytes_per_param, clean_env, summary, train_losses  # noqa: E402
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (fixture)

SBATCH = str(LAUNCH / "slurm.sbatch")


def _env(cluster, **extra):
    env = cluster.env()
    env.update(clean_env(**extra))
    env["SLURM_CONF"] = str(cluster.conf)
    return env


def _sbatch(cluster, tmp_path: Path, name: str, sbatch_args: list[str], overrides: list[str], **extra) -> str:
    log = tmp_path / f"{name}.log"
    cmd = ["sbatch", "--wait", "--job-name", name, "--output", str(log), *sbatch_args, SBATCH, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cluster, **extra), capture_output=True, text=True, timeout=300)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stderr}\n--- job log\n{text[-6000:]}\n{cluster.logs()}"
    return text


def test_srun_maps_slurm_variables(slurm_cluster):
    proc = subprocess.run(
        ["srun", "-N1", "-n2", sys.executable, "-m", "flashoptim_dist.launch_env"],
        cwd=REPO, env=_env(slurm_cluster), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    envs = sorted((json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")), key=lambda d: d["rank"])
    assert [(e["launcher"], e["rank"], e["world_size"], e["local_rank"], e["local_world_size"]) for e in envs] == [
        ("slurm", 0, 2, 0, 2), ("slurm", 1, 2, 1, 2)
    ]
    assert envs[0]["master_addr"] == "localhost" and envs[0]["master_port"] == envs[1]["master_port"]


def test_sbatch_one_task_per_rank(slurm_cluster, tmp_path):
    out = tmp_path / "tasks"
    log = _sbatch(slurm_cluster, tmp_path, "tasks", ["--nodes=1", "--ntasks-per-node=2"],
                  [*TINY, f"train.out_dir={out}", "train.steps=3", "train.ckpt_every=3"], MODE="tasks",
                  CONFIG=str(REPO / "configs" / "cpu_demo.yaml"))
    assert "mode=tasks" in log and "engine fsdp2 x 2 ranks (slurm)" in log, log[-3000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 3 and sorted(train_losses(out)) == [1, 2, 3]
    lo, hi = EXPECTED_BYTES_PER_PARAM
    assert lo <= bytes_per_param(s) <= hi


def test_sbatch_torchrun_per_node_and_resume(slurm_cluster, tmp_path):
    out = tmp_path / "torchrun"
    common = [*TINY, f"train.out_dir={out}", "train.ckpt_every=2"]
    log = _sbatch(slurm_cluster, tmp_path, "tr1", ["--nodes=1"], [*common, "train.steps=2"], MODE="torchrun",
                  NPROC_PER_NODE=2, CONFIG=str(REPO / "configs" / "cpu_demo.yaml"))
    assert "mode=torchrun" in log and "engine fsdp2 x 2 ranks (torchrun)" in log, log[-3000:]
    assert summary(out)["final_step"] == 2
    log = _sbatch(slurm_cluster, tmp_path, "tr2", ["--nodes=1"], [*common, "train.steps=4"], MODE="torchrun",
                  NPROC_PER_NODE=2, CONFIG=str(REPO / "configs" / "cpu_demo.yaml"))
    assert "resumed from step 2" in log, log[-3000:]
    assert summary(out)["final_step"] == 4 and sorted(train_losses(out)) == [1, 2, 3, 4]
