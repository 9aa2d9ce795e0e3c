"""Smoke test of bench/dist.py: the 2-rank FSDP2 benchmark runs on CPU with --tiny through
torchrun and reports the expected persistent bytes per parameter (params + optimizer state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def test_bench_dist_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "bench", "dist.py"), "--tiny", "--json", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert set(res) == {"torch_adamw", "flash", "flash_release"}
    # fp32 params + fp32 m, v = 12 bytes; bf16 param + int8 ρ, m, v + 2 bf16 scales / 32 = 5.125
    assert abs(res["torch_adamw"]["bytes_per_param_x_world"] - 12.0) < 0.05
    for case in ("flash", "flash_release"):
        assert abs(res[case]["bytes_per_param_x_world"] - 5.125) < 0.05, res[case]
    assert res["flash_release"]["step_ms"] is None and res["flash"]["step_ms"] > 0
    assert "bytes/param x world" in proc.stdout


def test_bench_dist_tiny_tensor_parallel(tmp_path):
    """--tp 2 on 2 ranks (dp 1 x tp 2): the same bytes per parameter (each rank holds half of
    every split weight; the norms, replicated over tp, add 320 x 2 elements of 131k)."""
    out = tmp_path / "bench_tp.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "bench", "dist.py"), "--tiny", "--tp", "2", "--cases", "flash,flash_release",
        "--iters", "3", "--measure", "1", "--json", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "tensor parallel 2 (dp 1 x tp 2)" in data["config"]
    for r in data["results"]:
        assert abs(r["bytes_per_param_x_world"] - 5.125) < 0.05, r


def test_run_isolated_starts_one_process_group_per_case():
    env = dict(os.environ, TORCHRUN="echo torchrun", NPROC="3")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_isolated.sh"), "bench/dist.py", "flash,torch_adamw",
                           "--tiny", "--ac"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "torchrun --nproc_per_node 3 bench/dist.py --cases flash --tiny --ac",
        "torchrun --nproc_per_node 3 bench/dist.py --cases torch_adamw --tiny --ac",
    ]
    bad = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_isolated.sh"), "bench/dist.py"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "usage" in bad.stderr


def test_train8b_script_passes_each_case_its_overrides(tmp_path):
    env = dict(os.environ, PYTHON="echo", OUT=str(tmp_path), NPROC="4")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "train8b.sh"),
                           "a=optim.name=AdamW,model.loss_chunks=8", "b=optim.gradient_release=true"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    a, b = (tmp_path / "a.log").read_text().split(), (tmp_path / "b.log").read_text().split()
    assert a[:3] == ["-m", "flashoptim_dist.train", "train"] and a[-2:] == ["optim.name=AdamW", "model.loss_chunks=8"]
    assert "dist.nproc_per_node=4" in a and "model.preset=8b" in a and "train.out_dir=/tmp/train8b/a" in a
    assert b[-1] == "optim.gradient_release=true" and "== a (rc 0" in proc.stdout
