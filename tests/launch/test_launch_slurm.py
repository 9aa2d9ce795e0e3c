"""The main job on a real SLURM cluster of two nodes on this machine (munge + slurmctld + one
slurmd per node, started by the test; tests/slurm_cluster.py). The node names (node1, node2) do
not resolve: the rendezvous must come from the first node's NodeAddr, as on clusters whose node
names are not in DNS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    EXPECTED_BYTES_PER_PARAM, LAUNCH, REPO, TINY, bytes_per_param, checkpoint_steps, clean_env, summary, train_losses,
)
# the `slurm_cluster` fixture, registered as a plugin (an imported fixture would be shadowed by
# every test's argument of the same name, which linters report as a redefinition)
pytest_plugins = ["slurm_cluster"]

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
    assert proc.returncode == 0, (
        f"sbatch exited {proc.returncode}: {proc.stderr}\n--- job log\n{text[-6000:]}\n{cluster.logs()}"
    )
    return text


def _salloc(cluster, tmp_path: Path, name: str, salloc_args: list[str], overrides: list[str], **extra) -> str:
    """launch/slurm.sbatch inside an allocation (``salloc ... bash launch/slurm.sbatch``), which the
    script supports like sbatch; salloc returns when the script ends, while ``sbatch --wait``
    polls (~10 s per job)."""
    cmd = ["salloc", "--job-name", name, *salloc_args, "bash", SBATCH, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cluster, CONFIG=str(REPO / "configs" / "cpu_demo.yaml"), **extra),
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"salloc exited {proc.returncode}:\n{text[-6000:]}\n{cluster.logs()}"
    return text


def test_srun_maps_slurm_variables(slurm_cluster):
    proc = subprocess.run(
        ["srun", "-N2", "-n4", sys.executable, "-m", "flashoptim_dist.launch_env"],
        cwd=REPO, env=_env(slurm_cluster), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    envs = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda d: d["rank"])
    assert [(e["launcher"], e["rank"], e["world_size"], e["local_rank"], e["local_world_size"], e["node_rank"])
            for e in envs] == [("slurm", 0, 4, 0, 2, 0), ("slurm", 1, 4, 1, 2, 0), ("slurm", 2, 4, 0, 2, 1),
                               ("slurm", 3, 4, 1, 2, 1)]
    # bare srun: the first host of the step's node list "node[1-2]", expanded without scontrol
    assert {(e["master_addr"], e["master_port"]) for e in envs} == {("node1", envs[0]["master_port"])}


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


def test_torchrun_per_node_and_resume(slurm_cluster, tmp_path):
    out = tmp_path / "torchrun"
    common = [*TINY, f"train.out_dir={out}", "train.ckpt_every=2"]
    log = _salloc(slurm_cluster, tmp_path, "tr1", ["--nodes=1"], [*common, "train.steps=2"], MODE="torchrun",
                  NPROC_PER_NODE=2)
    assert "mode=torchrun" in log and "engine fsdp2 x 2 ranks (torchrun)" in log, log[-3000:]
    assert summary(out)["final_step"] == 2
    log = _salloc(slurm_cluster, tmp_path, "tr2", ["--nodes=1"], [*common, "train.steps=4"], MODE="torchrun",
                  NPROC_PER_NODE=2)
    assert "resumed from step 2" in log, log[-3000:]
    assert summary(out)["final_step"] == 4 and sorted(train_losses(out)) == [1, 2, 3, 4]


def test_two_nodes_torchrun_fsdp2_then_hsdp_then_one_node(slurm_cluster, tmp_path):
    """The same script on 2 nodes and on 1: FSDP2 with one torchrun agent per node, then HSDP
    (one replica per node) with one task per rank resuming from it, then one node resuming."""
    out = tmp_path / "run"
    common = [*TINY, f"train.out_dir={out}", "train.eval_every=0"]
    log = _salloc(slurm_cluster, tmp_path, "two_tr", ["--nodes=2"], [*common, "train.steps=2", "train.ckpt_every=2"],
                  MODE="torchrun", NPROC_PER_NODE=1)
    # the rendezvous is node1's NodeAddr (node1 itself does not resolve)
    assert ("mode=torchrun nodes=2 rendezvous=127.0.0.1:" in log
            and "engine fsdp2 x 2 ranks (torchrun)" in log), log[-3000:]
    assert summary(out)["world_size"] == 2 and checkpoint_steps(out) == [2]
    log = _salloc(slurm_cluster, tmp_path, "two_tasks", ["--nodes=2", "--ntasks-per-node=1"],
                  [*common, "train.steps=3", "train.ckpt_every=3", "engine.replicas=nodes"], MODE="tasks")
    assert ("mode=tasks nodes=2" in log and "engine fsdp2 x 2 ranks (slurm)" in log
            and "HSDP 2 replicas x 1 shards" in log), log[-3000:]
    assert "resumed from step 2" in log and checkpoint_steps(out) == [2, 3]
    s = summary(out)
    assert [r["local_params"] for r in s["rows"]] == [s["n_params"]] * 2  # a whole replica on each node
    log = _salloc(slurm_cluster, tmp_path, "one", ["--nodes=1", "--ntasks-per-node=2"],
                  [*common, "train.steps=4", "train.ckpt_every=0"], MODE="tasks")
    assert "mode=tasks nodes=1" in log and "resumed from step 3" in log, log[-3000:]
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
