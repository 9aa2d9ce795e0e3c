"""The trainer's own engines on 2 CPU ranks (through launch/torchrun.sh): DDP and FSDP1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    EXPECTED_BYTES_PER_PARAM, LAUNCH, TINY, bytes_per_param, checkpoint_steps, clean_env, run, summary, train_losses,
)


@pytest.mark.parametrize("engine", ["ddp", "fsdp1"])
def test_engine_trains_checkpoints_and_accumulates(tmp_path, engine):
    out = tmp_path / engine
    # global batch 16 = 4 per rank x 2 ranks x 2 accumulation steps
    proc = run(
        ["bash", str(LAUNCH / "torchrun.sh"), *TINY, f"engine.name={engine}", "data.global_batch_size=16",
         f"train.out_dir={out}", "train.steps=4", "train.ckpt_every=4"],
        cwd=tmp_path, env=clean_env(NPROC_PER_NODE=2),
    )
    assert f"engine {engine} x 2 ranks (torchrun)" in proc.stdout and "(2 accumulation steps)" in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert checkpoint_steps(out) == [4]
    s = summary(out)
    held = [r["local_params"] for r in s["rows"]]
    if engine == "ddp":
        assert held == [s["n_params"], s["n_params"]]  # replicated
    else:
        assert sum(held) == s["n_params"]  # flat-sharded (use_orig_params views)
    lo, hi = EXPECTED_BYTES_PER_PARAM
    assert lo <= bytes_per_param(s) <= hi, s["rows"]
