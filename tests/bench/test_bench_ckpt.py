"""Smoke test of bench/ckpt.py: the 2-rank save → 1-rank reshard load benchmark runs on CPU with
--tiny and reports a Flash checkpoint smaller per parameter than the plain DCP AdamW one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def test_bench_ckpt_tiny(tmp_path):
    out = tmp_path / "ckpt.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ckpt.py"), "--tiny", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"flash", "torch"}
    # tiny model: the fixed-size metadata weighs more than at 1.3e9 params, but the order holds
    assert by_case["flash"]["bytes_per_param"] < by_case["torch"]["bytes_per_param"]
    assert all(r["reshard_load_1rank_s"] > 0 and r["save_s"] > 0 for r in rows)
