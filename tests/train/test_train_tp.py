"""The trainer with ``engine.tp_size`` (issue 15): FSDP2 + tensor parallelism on the built-in GPT.

A tiny GPT trains 20 steps on (dp 2 × tp 2) gloo ranks through ``run_training`` with
torchtitan's plan (GPT.tensor_parallel_plan) and FlashAdamW; the loss curve stays within
``tp_loss_vs_one_device`` (tests/tolerances.py, where the reason is) of the one-device run on the
same global batches, and so do a run accumulating 2 micro-batches per step and HSDP + TP
(2 replicas × 1 shard × tp 2, ``engine.replicas=2``). The per-rank
bytes-per-parameter table counts each rank's own shards. Misconfigurations fail before anything
is built, naming the key and the fix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from dist_utils import run_distributed  # noqa: E402
from launch_helpers import TINY, preserved_environ, summary, train_losses  # noqa: E402
from tolerances import TOLERANCES  # noqa: E402

from flashoptim_dist.train.config import ConfigError, load_config  # noqa: E402

STEPS = 20
COMMON = [*TINY, "optim.name=FlashAdamW", "optim.lr=3e-3", f"train.steps={STEPS}", "train.ckpt_every=0",
          "train.eval_every=0", "train.threads=1", "data.max_bytes=400000", "data.eval_sequences=8"]


def _train_worker(rank, world, runs):
    from flashoptim_dist.train.trainer import run_training

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # launch_env.detect wants it with WORLD_SIZE > 1
    out = {}
    for tag, overrides in runs:
        res = run_training(load_config(None, [*COMMON, *overrides]))
        out[tag] = {"n_params": res["n_params"], "rows": res["rows"], "tp": res["tp_size"], "layout": res["layout"]}
    return out


def test_fsdp2_tp_trains_like_one_device_and_counts_bytes_per_rank(tmp_path):
    tp_runs = [
        ("tp", ["engine.name=fsdp2", "engine.tp_size=2", "data.micro_batch_size=4", "data.global_batch_size=8",
                f"train.out_dir={tmp_path / 'tp'}"]),
        ("tp_accum", ["engine.name=fsdp2", "engine.tp_size=2", "data.micro_batch_size=2", "data.global_batch_size=8",
                      f"train.out_dir={tmp_path / 'tp_accum'}"]),
        ("hsdp_tp", ["engine.name=fsdp2", "engine.replicas=2", "engine.tp_size=2", "data.micro_batch_size=4",
                     "data.global_batch_size=8", f"train.out_dir={tmp_path / 'hsdp_tp'}"]),
    ]
    res = run_distributed(_train_worker, 4, tp_runs, timeout=400)[0]
    assert res["hsdp_tp"]["layout"] == "HSDP 2 replicas x 1 shards x tensor parallel 2"
    assert res["tp"]["layout"] == "FSDP2 over 2 x tensor parallel 2"
    with preserved_environ():
        run_distributed(_train_worker, 1, [("one", ["engine.name=single", "data.micro_batch_size=8",
                                                    "data.global_batch_size=8", f"train.out_dir={tmp_path / 'one'}"])])
    ref = train_losses(tmp_path / "one")
    assert ref[STEPS] < ref[1] - 0.5, "the task must be learnable, else the comparison is vacuous"
    tol = TOLERANCES["tp_loss_vs_one_device"]
    for tag in ("tp", "tp_accum", "hsdp_tp"):
        got = train_losses(tmp_path / tag)
        assert sorted(got) == list(range(1, STEPS + 1))
        worst = max(abs(got[s] - ref[s]) for s in ref)
        assert worst <= tol, f"{tag}: loss differs from the one-device run by {worst} (> {tol})"
    text = (tmp_path / "tp" / "summary.md").read_text()
    assert "Tensor parallel (engine.tp_size=2)" in text

    # bytes per parameter, per rank: each rank's own shards (1/4 of every split weight, 1/2 of the
    # norms, which both tp ranks of a dp group hold)
    s = summary(tmp_path / "tp")
    assert s["tp_size"] == 2 and res["tp"]["tp"] == 2 and res["tp"]["rows"] == s["rows"]
    from flashoptim_dist.models import GPT, gpt_config_for

    model_cfg = load_config(None, COMMON).model
    model = GPT(gpt_config_for(model_cfg, 256, 64))
    split = {n for n in model.tensor_parallel_plan()}
    norms = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in split)
    assert s["n_params"] == sum(p.numel() for p in model.parameters())
    held = [r["local_params"] for r in s["rows"]]
    assert sum(held) == s["n_params"] + norms, (held, s["n_params"], norms)  # norms counted once per tp rank
    assert max(held) - min(held) <= norms  # balanced shards
    for r in s["rows"]:
        n = r["local_params"]
        assert r["param_bytes"] == 2 * n and r["grad_bytes"] == 2 * n, r  # bf16 params and grads
        assert 3.0 * n <= r["optim_bytes"] <= 3.3 * n, r  # int8 ρ + 8-bit moments + scales


def test_tp_config_errors_name_the_key_and_the_fix():
    for overrides, parts in [
        (["engine.tp_size=0"], ["engine.tp_size=0 is invalid", "positive integer"]),
        (["engine.name=ddp", "engine.tp_size=2"], ["composes with fsdp2 only"]),
        (["engine.tp_size=2", "model.loss_chunks=4"], ["model.loss_chunks=4 is invalid with engine.tp_size=2"]),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        for part in parts:
            assert part in str(e.value), (part, str(e.value))
    assert load_config(None, ["engine.tp_size=2"]).engine.tp_size == 2


def test_tp_build_errors_name_the_model_shape():
    from flashoptim_dist.models import GPT, preset
    from flashoptim_dist.train.engines import EngineError, _check_tensor_parallel, parallel_dims

    cfg = load_config(None, ["engine.tp_size=4"])
    with pytest.raises(EngineError, match="engine.tp_size=4 does not divide the 6 ranks"):
        parallel_dims(cfg, 0, 6)
    assert parallel_dims(cfg, 5, 8) == (1, 2, 4)  # rank 5 = dp 1, tp 1 of a (2, 4) mesh
    tiny = GPT(preset("tiny", vocab_size=256))  # d_model 64, 4 heads of 16, d_ff 192
    with pytest.raises(EngineError) as e:
        _check_tensor_parallel(cfg, tiny, flash=True)
    msg = str(e.value)
    assert "blocks.*.attn.wo (64 columns) splits into 16 columns per rank, not a multiple" in msg, msg
    assert "blocks.*.mlp.w2 (192 columns) splits into 48 columns per rank" in msg, msg
    _check_tensor_parallel(cfg, tiny, flash=False)  # a torch optimizer has no groups to cut
    with pytest.raises(EngineError) as e:
        _check_tensor_parallel(load_config(None, ["engine.tp_size=3"]),
                               GPT(preset("tiny", vocab_size=256, tie_embeddings=True)), flash=True)
    msg = str(e.value)
    for part in ("model.n_heads=4 is not divisible by engine.tp_size=3", "model.vocab_size=256 is not divisible",
                 "model.tie_embeddings=false"):
        assert part in msg, (part, msg)
    _check_tensor_parallel(load_config(None, ["engine.tp_size=2"]), tiny, flash=True)
