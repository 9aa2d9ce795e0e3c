"""Smoke test of bench/deepspeed_bench.py: the 2-rank DeepSpeed ZeRO-2/3 benchmark runs on CPU with
--tiny through torchrun (DS_ACCELERATOR=cpu, gloo) and reports the expected persistent bytes per
parameter (params + master partitions + optimizer state, counted from the tensors).

Expected bytes/param summed over the 2 ranks (tiny GPT, no partition padding to speak of):

=========  ==========================================  ==============================================
case       ZeRO-2 (bf16 params replicated)             ZeRO-3 (bf16 params partitioned)
=========  ==========================================  ==============================================
default    2·2 + fp32 master 4 + fp32 m, v 8 = 16      2 + 4 + 8 = 14
bf16 mode  2·2 + bf16 master copy 2 + bf16 m, v 4 = 10  2 + 2 + 4 = 8
flash      2·2 + ρ, m, v int8 + scales 3.125 = 7.125   2 + 3.125 = 5.125 (master = model partition)
=========  ==========================================  ==============================================
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from optional_deps import require_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

require_module("deepspeed", module_level=True)

EXPECTED = {
    "z2_ds_default": 16.0, "z2_ds_bf16": 10.0, "z2_flash": 7.125,
    "z3_ds_default": 14.0, "z3_ds_bf16": 8.0, "z3_flash": 5.125,
}


def test_bench_deepspeed_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(ROOT, "bench", "deepspeed_bench.py"), "--tiny", "--json", str(out),
    ]
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE="2", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    t0 = time.time()
    # ~10 s warm; DeepSpeed builds its CPU comm op (~35 s) on a machine's first CPU run
    # the timeout only catches a hang: as the first DeepSpeed test on a fresh machine this run
    # JIT-builds DeepSpeed's CPU ops (35-80 s), and on a loaded 2-core machine it took >240 s
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    res = {r["case"]: r for r in data["results"]}
    assert set(res) == set(EXPECTED), sorted(res)
    assert data["world"] == 2
    for case, bpp in EXPECTED.items():
        got = res[case]["bytes_per_param_x_world"]
        assert abs(got - bpp) < 0.1, (case, got, bpp)
        assert res[case]["iter_ms"] > 0 and res[case]["step_ms"] > 0, res[case]
        for r in res[case]["ranks"]:
            assert r["engine_freed"], f"{case} rank {r['rank']}: the engine outlived its case"
            want = "float32" if case.endswith("ds_default") else "bfloat16"
            assert r["master_dtype"] == want, (case, r["master_dtype"])
            assert r["basic_optimizer"] == ("FlashAdamW" if case.endswith("flash") else "AdamW"), r
    for stage in (2, 3):
        default = res[f"z{stage}_ds_default"]["bytes_per_param_x_world"]
        bf16 = res[f"z{stage}_ds_bf16"]["bytes_per_param_x_world"]
        ours = res[f"z{stage}_flash"]["bytes_per_param_x_world"]
        assert ours < bf16 < default, (stage, ours, bf16, default)
        # DeepSpeed's duplicate bf16 master partition was dropped
        assert all(r["dedupe_bytes"] > 0 for r in res[f"z{stage}_flash"]["ranks"])
    # the printed table has every case, per rank and in the summary
    assert "bytes/param x world" in proc.stdout
    for case in EXPECTED:
        assert proc.stdout.count(case) >= 3, case  # 2 rank rows + 1 summary row
    print(f"bench/deepspeed_bench.py --tiny on 2 CPU ranks: {elapsed:.1f} s")
