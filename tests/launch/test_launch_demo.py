"""launch/demo.sh — the README's "run the main job" command — end to end, a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import LAUNCH, TINY, clean_env, run, summary, train_losses  # noqa: E402


def test_demo_script_sets_up_and_trains(tmp_path):
    out = tmp_path / "demo"
    venv = Path(sys.executable).parent.parent  # reuse the environment the tests run in
    env = clean_env(VENV=str(venv))
    proc = run(["bash", str(LAUNCH / "demo.sh"), *TINY, "train.steps=3", "train.eval_every=3",
                "train.ckpt_every=3", f"train.out_dir={out}"], cwd=tmp_path, env=env, timeout=400)
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3]
    s = summary(out)
    assert s["world_size"] == 2 and s["engine"] == "fsdp2"
    assert "bytes" in proc.stdout.lower()
