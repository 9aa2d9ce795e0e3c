"""`python -m flashoptim_dist.train` without a launcher starts its own local ranks (the README's one command)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import CONFIGS, TINY, clean_env, run, summary  # noqa: E402


def test_self_launch_starts_two_ranks(tmp_path):
    out = tmp_path / "demo"
    proc = run([sys.executable, "-m", "flashoptim_dist.train", "train", "--config", str(CONFIGS / "cpu_demo.yaml"),
                *TINY, f"train.out_dir={out}", "train.steps=2", "train.ckpt_every=0"], cwd=tmp_path, env=clean_env())
    assert "no launcher detected: starting 2 local ranks with torchrun" in proc.stdout
    assert "engine fsdp2 x 2 ranks (torchrun)" in proc.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 2


def test_single_engine_runs_in_process(tmp_path):
    out = tmp_path / "single"
    proc = run([sys.executable, "-m", "flashoptim_dist.train", *TINY, "engine.name=single", f"train.out_dir={out}",
                "train.steps=2", "train.ckpt_every=0"], cwd=tmp_path, env=clean_env())
    assert "no launcher detected" not in proc.stdout and "engine single x 1 ranks (none)" in proc.stdout
    assert summary(out)["final_step"] == 2
