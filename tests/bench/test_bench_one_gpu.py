"""bench/one_gpu.sh and bench/one_gpu_resume.sh (issue 17) on CPU with the tiny shapes: the table
they print and the resume check they make are what the GPU runs report (docs/PERFORMANCE.md,
"One GPU"), so they must work before a device call is spent on them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.preset=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "data.seq_len=64", "data.eval_sequences=2", "data.max_bytes=200000", "train.threads=1"]


def _run(cmd, env):
    full = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    res = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_one_gpu_table_reports_each_case_and_an_out_of_range_one(tmp_path):
    flash = "configs/one_gpu_8b.yaml:" + ",".join(TINY)
    adamw = flash + ",optim.name=AdamW,optim.gradient_release=false,optim.fused=true,train.peak_tflops=1"
    bad = flash + ",model.n_layers=0"  # a config error stands in for an OOM: the row says it failed
    out = _run(["bash", "bench/one_gpu.sh", f"flash={flash}", f"adamw={adamw}", f"bad={bad}"],
               {"OUT": str(tmp_path), "STEPS": "2", "LOG_EVERY": "1"})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case")}
    assert rows["flash"][0] == "ok" and rows["flash"][4] == "5.12"  # B/param with gradient release
    assert rows["adamw"][0] == "ok" and rows["adamw"][4] == "16.00" and rows["adamw"][6] != "-"  # MFU with a peak
    assert rows["bad"][0] == "rc 2"


def test_one_gpu_resume_finds_the_resumed_step_equal(tmp_path):
    out = _run(["bash", "bench/one_gpu_resume.sh", *TINY], {"OUT": str(tmp_path / "w"), "STEPS": "5", "AT": "2"})
    assert "-> EQUAL" in out, out
    assert "== E: rc 0" in out and "export:" in out
    assert not (tmp_path / "w" / "b" / "checkpoints").exists()  # cleaned up (the device disk is small)
