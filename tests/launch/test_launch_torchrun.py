"""The main job under launch/torchrun.sh on 2 CPU ranks (FSDP2 + FlashAdamW): run, resume, reshard, kill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    EXPECTED_BYTES_PER_PARAM, LAUNCH, OPTIMIZER, TINY, bytes_per_param, checkpoint_steps, clean_env, copy_checkpoint,
    free_port, preserved_environ,
    descendants, kill_tree, read_metrics, run, summary, train_losses,
)

TORCHRUN = ["bash", str(LAUNCH / "torchrun.sh")]


def _torchrun(out: Path, *overrides: str, cwd: Path, nproc: int = 2):
    return run([*TORCHRUN, *TINY, f"train.out_dir={out}", *overrides], cwd=cwd, env=clean_env(NPROC_PER_NODE=nproc))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 steps on 2 ranks, checkpoints at 3 and 6: the uninterrupted reference."""
    base = tmp_path_factory.mktemp("torchrun")
    out = base / "ref"
    proc = _torchrun(out, "train.steps=6", "train.ckpt_every=3", "train.eval_every=3", cwd=base)
    return base, out, proc


def test_two_ranks_fsdp2_flash(reference_run):
    base, out, proc = reference_run
    assert "engine fsdp2 x 2 ranks (torchrun)" in proc.stdout and OPTIMIZER in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "eval"] == [3, 6]
    assert checkpoint_steps(out) == [3, 6]
    s = summary(out)
    assert s["world_size"] == 2 and len(s["rows"]) == 2 and s["engine"] == "fsdp2"
    # each rank holds half of the parameters (dim-0 shards)
    assert sum(r["local_params"] for r in s["rows"]) == s["n_params"]
    lo, hi = EXPECTED_BYTES_PER_PARAM
    assert lo <= bytes_per_param(s) <= hi, s["rows"]
    assert "bytes/param" in proc.stdout and "16 bytes/param (4 param + 4 grad + 8 state)" in proc.stdout


def test_resume_from_checkpoint_matches_uninterrupted_run(reference_run):
    base, ref, _ = reference_run
    out = base / "resumed"
    copy_checkpoint(ref, 3, out)
    proc = _torchrun(out, "train.steps=6", "train.ckpt_every=3", "train.eval_every=3", cwd=base)
    assert "resumed from step 3" in proc.stdout
    a, b = train_losses(ref), train_losses(out)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=2e-5), (step, a, b)


def test_resume_on_one_rank_from_two_rank_checkpoint(reference_run):
    from flashoptim_dist.train.config import load_config
    from flashoptim_dist.train.trainer import main_train

    base, ref, _ = reference_run
    out = base / "one_rank"
    copy_checkpoint(ref, 6, out)
    common = [*TINY, "engine.name=single", f"train.out_dir={out}", "train.threads=1", "train.ckpt_every=0"]
    with preserved_environ():
        res = main_train(load_config(None, [*common, "train.steps=6"]))  # nothing to train: just load + evaluate
    assert res["resumed_from"] == 6 and res["world_size"] == 1
    ref_val = [r for r in read_metrics(ref) if r["kind"] == "eval"][-1]["val_loss"]
    # same weights evaluated on 1 rank instead of 2 (bf16 compute: summation order differs slightly)
    assert res["final_val_loss"] == pytest.approx(ref_val, abs=5e-3)
    with preserved_environ():
        res = main_train(load_config(None, [*common, "train.steps=8"]))
    assert res["resumed_from"] == 6 and res["final_step"] == 8
    losses = train_losses(out)
    assert sorted(losses) == [7, 8] and losses[8] < train_losses(ref)[1]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return fh.read()
    except OSError:
        return "zombie"


def test_kill_mid_run_and_resume(tmp_path):
    out = tmp_path / "killed"
    cmd = [*TORCHRUN, *TINY, f"train.out_dir={out}", "train.steps=100000", "train.ckpt_every=2", "train.eval_every=0"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(NPROC_PER_NODE=2), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not [s for s in checkpoint_steps(out) if s >= 4]:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        workers = descendants(proc.pid)
        kill_tree(proc.pid)  # torchrun and its workers at once, like a node failure
        proc.wait(timeout=60)
        time.sleep(0.5)
        assert not [p for p in workers
                    if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)], "workers survived"
        log.close()
    saved = checkpoint_steps(out)
    assert saved and saved[-1] >= 4
    last = saved[-1]
    proc = run([*TORCHRUN, *TINY, f"train.out_dir={out}", f"train.steps={last + 2}", "train.ckpt_every=2"],
               cwd=tmp_path, env=clean_env(NPROC_PER_NODE=2))
    assert f"resumed from step {last}" in proc.stdout
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == last + 2  # no step logged twice
    assert summary(out)["final_step"] == last + 2
    assert checkpoint_steps(out)[-1] == last + 2


# ---- two nodes on one machine: two torchrun agents (NNODES=2) meeting at a c10d rendezvous

def _two_agents(out: Path, nproc: tuple[int, int], *overrides: str, cwd: Path,
                check: bool = True) -> list[tuple[int, str]]:
    """Run launch/torchrun.sh twice at once, as the two nodes of one job; (exit code, output) of each."""
    port = free_port()
    env = dict(NNODES=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=f"two-nodes-{port}",
               FLASHOPTIM_RDZV_TIMEOUT=120)
    agents = [subprocess.Popen([*TORCHRUN, *TINY, f"train.out_dir={out}", *overrides], cwd=cwd,
                               env=clean_env(NPROC_PER_NODE=n, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True) for n in nproc]
    results = []
    try:
        for a in agents:
            text, _ = a.communicate(timeout=240)
            results.append((a.returncode, text))
    finally:
        for a in agents:
            kill_tree(a.pid)
    if check:
        assert all(rc == 0 for rc, _ in results), "\n=====\n".join(t[-4000:] for _, t in results)
    return results


def _resume_on_one_node(src: Path, step: int, out: Path, cwd: Path, *overrides: str) -> str:
    copy_checkpoint(src, step, out)
    proc = _torchrun(out, *overrides, cwd=cwd)
    assert f"resumed from step {step}" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def test_two_nodes_fsdp2_and_hsdp_each_resumed_on_one_node(tmp_path):
    """FSDP2 over two agents of one rank each, continued exactly on one node; then HSDP with one
    replica per node (2 agents x 2 ranks) from that checkpoint, continued on one node."""
    out = tmp_path / "two_nodes"
    common = ("train.eval_every=0", "data.micro_batch_size=2")
    results = _two_agents(out, (1, 1), *common, "train.steps=3", "train.ckpt_every=2", cwd=tmp_path)
    text = "".join(t for _, t in results)
    # one rank per agent: a world of 2 exists only if both agents met at the rendezvous
    assert "engine fsdp2 x 2 ranks (torchrun)" in text, text[-3000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 3 and checkpoint_steps(out) == [2, 3]
    assert sum(r["local_params"] for r in s["rows"]) == s["n_params"]  # sharded over both nodes
    _resume_on_one_node(out, 2, tmp_path / "one_node", tmp_path, *common, "train.steps=3", "train.ckpt_every=0")
    a, b = train_losses(out), train_losses(tmp_path / "one_node")
    assert sorted(b) == [3] and b[3] == pytest.approx(a[3], abs=2e-5), (a, b)  # the same 2-rank mesh, bit for bit

    results = _two_agents(out, (2, 2), *common, "train.steps=4", "train.ckpt_every=4", "engine.replicas=nodes",
                          cwd=tmp_path)
    text = "".join(t for _, t in results)
    assert "engine fsdp2 x 4 ranks (torchrun)" in text and "HSDP 2 replicas x 2 shards" in text, text[-3000:]
    assert "resumed from step 3" in text and checkpoint_steps(out)[-1] == 4
    s = summary(out)
    # each node holds the whole model, each of its 2 ranks half of it
    assert s["world_size"] == 4 and [r["local_params"] * 2 for r in s["rows"]] == [s["n_params"]] * 4
    _resume_on_one_node(out, 4, tmp_path / "one_node_hsdp", tmp_path, *common, "train.steps=5", "train.ckpt_every=0")
    losses = {**train_losses(out), **train_losses(tmp_path / "one_node_hsdp")}
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1], losses


def test_two_nodes_with_uneven_ranks_cannot_have_one_replica_per_node(tmp_path):
    results = _two_agents(tmp_path / "uneven", (2, 1), "train.steps=1", "data.micro_batch_size=1",
                          "data.global_batch_size=6", "engine.replicas=nodes", cwd=tmp_path, check=False)
    text = "".join(t for _, t in results)
    assert all(rc != 0 for rc, _ in results), text[-3000:]
    assert ("error: engine.replicas=nodes needs the same number of ranks on every node, but the 2 nodes run"
            in text), text[-3000:]
    assert "2 nodes do not divide the 3 ranks evenly" in text and "the same NPROC_PER_NODE everywhere" in text
