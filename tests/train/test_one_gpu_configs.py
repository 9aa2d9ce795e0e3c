"""configs/one_gpu_8b.yaml and configs/one_gpu_20b.yaml (issue 17): the one-GPU recipes are valid,
describe the sizes their comments state, use the settings that make them fit (single engine,
gradient release, meta init, activation checkpointing, sliced loss), and train end to end on CPU
when shrunk to the tiny shapes. Whether they fit on a GPU is measured by bench runs, not here."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import preserved_environ, summary, train_losses  # noqa: E402

from flashoptim_dist.models import gpt_config_for  # noqa: E402
from flashoptim_dist.train.config import config_to_dict, load_config  # noqa: E402
from flashoptim_dist.train.trainer import main_train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BYTES_PER_PARAM = 2 + 1 + 1 + 1 + 4 / 32  # bf16 param, int8 ρ, 8-bit m and v, a bf16 scale each per 32


@pytest.mark.parametrize("name, low, high", [("one_gpu_8b", 8.0e9, 8.1e9), ("one_gpu_20b", 20.0e9, 20.5e9)])
def test_recipe_sizes_and_settings(name, low, high):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(str(path))
    n = gpt_config_for(cfg.model, 256, cfg.data.seq_len).num_params()
    assert low <= n <= high, n
    # the comment's parameter count and persistent GiB are this arithmetic
    text = path.read_text()
    stated = float(re.search(r"(\d+\.\d+)e9[- ]parameter", text).group(1))
    assert abs(stated * 1e9 - n) < 0.01e9, (stated, n)
    gib = n * BYTES_PER_PARAM / 2**30
    assert f"{gib:.1f} GiB" in text, gib
    assert cfg.engine.name == "single" and cfg.optim.name == "FlashAdamW" and cfg.optim.gradient_release
    assert cfg.model.init_device == "meta" and cfg.model.activation_checkpointing and cfg.model.loss_chunks == 8


def test_fast_8b_recipe_is_the_8b_one_without_recomputation():
    """one_gpu_8b_fast.yaml extends one_gpu_8b.yaml: only activation checkpointing (off), the
    sequences per step (2) and the output folder differ."""
    base = config_to_dict(load_config(str(CONFIGS / "one_gpu_8b.yaml")))
    fast = config_to_dict(load_config(str(CONFIGS / "one_gpu_8b_fast.yaml")))
    diff = {(sec, k) for sec in base for k in base[sec] if base[sec][k] != fast[sec][k]}
    assert diff == {("model", "activation_checkpointing"), ("data", "micro_batch_size"), ("train", "out_dir")}
    assert fast["model"]["activation_checkpointing"] is False and fast["data"]["micro_batch_size"] == 2


@pytest.mark.parametrize("name", ["one_gpu_8b", "one_gpu_8b_fast", "one_gpu_20b"])
def test_recipe_trains_when_shrunk(tmp_path, name):
    """Every setting of the recipe but the shapes, sequence length and step count, on CPU."""
    tiny = ["model.preset=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
            "model.d_ff=192", "model.vocab_size=256", "data.seq_len=64", "data.max_bytes=400000",
            "data.eval_sequences=4", "train.steps=3", "train.ckpt_every=3", "train.eval_every=3",
            "train.threads=1", "train.log_every=1", f"train.out_dir={tmp_path / 'run'}", "train.progress=false"]
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), tiny)
    with preserved_environ():
        res = main_train(cfg)
    assert res["final_step"] == 3 and sorted(train_losses(tmp_path / "run")) == [1, 2, 3]
    row = summary(tmp_path / "run")["rows"][0]
    assert row["grad_bytes"] == 0  # gradient release: no gradient outlives its hook
