"""Model FLOPs and MFU (train/flops.py, issue 17 item 3), the trainer's optim.fused and its
autocast without a weight cache (the torch AdamW baseline of the one-GPU size search)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import preserved_environ  # noqa: E402
from optional_deps import require_module  # noqa: E402

from flashoptim_dist.models.gpt import GPT, GPTConfig  # noqa: E402
from flashoptim_dist.train import flops  # noqa: E402
from flashoptim_dist.train.config import ConfigError, load_config  # noqa: E402
from flashoptim_dist.train.optimizers import build_optimizer  # noqa: E402
from flashoptim_dist.train.trainer import main_train  # noqa: E402


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_flops_per_token_is_torchtitans_count(tie):
    """6·(N − N_embedding) + 12·L·H·Q·T, counted from the shapes by hand; a tied head is the
    embedding's parameter, so it drops out of the 6N term as in torchtitan."""
    cfg = GPTConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=80, max_seq_len=64,
                    tie_embeddings=tie)
    with torch.device("meta"):  # shapes only: no memory
        model = GPT(cfg)
    d, hd, L = 32, 8, 3
    attn = d * d + 2 * d * (2 * hd) + d * d  # wq, wk, wv (2 kv heads), wo
    mlp = 3 * d * 80
    norms = 2 * d
    blocks = L * (attn + mlp + norms)
    head = 0 if tie else 96 * d
    final_norm = d
    n_non_embedding = blocks + head + final_norm
    assert flops.attention_shape(model) == (3, 4, 8)
    assert flops.flops_per_token(model, 64) == 6 * n_non_embedding + 12 * L * 4 * hd * 64


def test_hf_decoder_attention_shape():
    transformers = require_module("transformers")  # a test extra: CI fails rather than skips without it
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    assert flops.attention_shape(model) == (2, 6, 8)
    n = sum(p.numel() for p in model.parameters())
    n_emb = model.model.embed_tokens.weight.numel()
    assert flops.flops_per_token(model, 16) == 6 * (n - n_emb) + 12 * 2 * 6 * 8 * 16


def test_unknown_model_and_device_give_no_mfu():
    assert flops.flops_per_token(torch.nn.Linear(4, 4), 8) is None
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), 100.0) == 100e12
    assert flops.mfu(None, 1e3, 1e12, 1) is None and flops.mfu(1e9, 1e3, None, 1) is None
    # 2 ranks at 50% each: 1e9 FLOP/token x 1e3 tokens/s over 2 x 1e12
    assert flops.mfu(1e9, 1e3, 1e12, 2) == pytest.approx(0.5)


def test_peak_table_order_puts_variants_before_their_family():
    names = [k for k, _ in flops.PEAK_BF16_FLOPS]
    assert names.index("H100 NVL") < names.index("H100") and names.index("H100 PCIe") < names.index("H100")


def test_trainer_logs_mfu_with_a_peak(tmp_path):
    """With train.peak_tflops the metrics lines carry mfu = flops/token × tokens/s ÷ peak."""
    over = ["model.preset=tiny", "data.seq_len=32", "data.max_bytes=200000", "data.eval_sequences=2",
            "engine.name=single", "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
            "train.progress=false", "train.threads=1", "train.peak_tflops=0.001", f"train.out_dir={tmp_path / 'r'}"]
    with preserved_environ():
        res = main_train(load_config(None, over))
    import json

    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("kind") == "train"]
    assert train and all(x["mfu"] is not None for x in train)
    last = train[-1]
    assert last["mfu"] == pytest.approx(res["flops_per_token"] * last["tokens_per_s"] / 1e9)


def test_bad_peak_and_fused_keys_are_refused():
    with pytest.raises(ConfigError, match="train.peak_tflops=0.0 is invalid"):
        load_config(None, ["train.peak_tflops=0"])
    with pytest.raises(ConfigError, match="optim.fused=true is invalid with optim.name='FlashAdamW'"):
        load_config(None, ["optim.fused=true"])


def test_fused_reaches_torch_adamw():
    cfg = load_config(None, ["optim.name=AdamW", "optim.fused=true"])
    opt = build_optimizer(cfg.optim, torch.nn.Linear(4, 4))
    assert opt.defaults["fused"] is True
    assert build_optimizer(load_config(None, ["optim.name=AdamW"]).optim, torch.nn.Linear(4, 4)).defaults["fused"] in (
        None, False)


def test_autocast_of_fp32_baselines_keeps_no_weight_cache():
    """The engine's bf16 autocast runs with cache_enabled=False: the cache would hold a bf16 copy
    of every weight until the forward ends (2 bytes/param at the peak under checkpointing)."""
    from flashoptim_dist.train._engine import Engine

    m = torch.nn.Linear(4, 4)
    eng = Engine("single", m, m, None, torch.device("cpu"), autocast=True)
    with eng._autocast():
        assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_cache_enabled()
