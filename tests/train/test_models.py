"""The built-in GPT family and the Hugging Face loader."""

from __future__ import annotations

import pytest

from optional_deps import require_module
import torch

from flashoptim_dist.models import GPT, PRESETS, build_model, count_params, gpt_config_for
from flashoptim_dist.models.gpt import GPTConfig, preset
from flashoptim_dist.train.config import load_config


def test_preset_sizes_match_their_namesakes():
    with torch.device("meta"):
        m8 = GPT(PRESETS["8b"])
    assert count_params(m8) == PRESETS["8b"].num_params() == 8_030_261_248  # Llama-3-8B
    c = PRESETS["8b"]
    assert (c.d_model, c.n_layers, c.ff_dim, c.vocab_size, c.kv_heads) == (4096, 32, 14336, 128256, 8)
    assert PRESETS["1b"].num_params() == 1_235_814_400  # Llama-3.2-1B (tied)
    sizes = [PRESETS[n].num_params() for n in ("tiny", "mini", "small", "125m", "350m", "1b", "3b", "8b")]
    assert sizes == sorted(sizes)
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            assert count_params(GPT(cfg)) == cfg.num_params(), name


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu"},
        {"n_kv_heads": 2, "tie_embeddings": True},
    ],
)
def test_forward_is_causal_and_counts_match(opts):
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **opts)
    m = GPT(cfg)
    assert count_params(m) == cfg.num_params()
    x = torch.randint(0, 256, (2, 16))
    y = m(x)
    assert y.shape == (2, 16, 256) and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256
    y2 = m(x2)
    assert torch.allclose(y[:, :10], y2[:, :10], atol=1e-5)
    assert not torch.allclose(y[:, 10:], y2[:, 10:])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4))
    b = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4, activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 12))
    for m in (a, b):
        m(x).float().pow(2).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


@pytest.mark.parametrize("chunks", [1, 3])
def test_chunked_loss_is_the_loss_of_the_logits(chunks):
    """forward(idx, targets, loss_chunks) gives the mean cross-entropy of forward(idx)'s logits
    and the same gradients, with head and loss recomputed slice by slice in backward."""
    torch.manual_seed(0)
    a = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4)).to(torch.bfloat16)
    b = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4)).to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 13))
    y = torch.randint(0, 256, (2, 13))
    la = torch.nn.functional.cross_entropy(a(x).float().reshape(-1, 256), y.reshape(-1))
    lb = b(x, targets=y, loss_chunks=chunks)
    assert lb.dtype == torch.float32
    assert torch.allclose(la, lb, rtol=1e-6), (la, lb)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad.float(), pb.grad.float(), rtol=1e-2, atol=1e-4), n
    with pytest.raises(ValueError, match="loss_chunks must be a positive int"):
        b(x, targets=y, loss_chunks=0)
    with pytest.raises(ValueError, match="targets must have the shape"):
        b(x, targets=y[:, :5])


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        m = GPT(PRESETS["tiny"])
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    std = m.blocks[0].attn.wq.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.equal(m.blocks[0].attn_norm.weight, torch.ones(64))
    assert m.blocks[0].mlp.w2.weight.std().item() < std  # residual projections are scaled down


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="n_heads=5 must divide d_model=64"):
        GPTConfig(d_model=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        GPTConfig(n_kv_heads=3)
    with pytest.raises(KeyError, match="allowed: tiny"):
        preset("huge")
    with pytest.raises(ValueError, match="exceeds model max_seq_len"):
        GPT(GPTConfig(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


def test_build_model_from_config():
    cfg = load_config(None, ["model.preset=tiny", "model.d_model=48", "model.n_heads=4"])
    m = build_model(cfg.model, vocab_size=256, seq_len=512)
    assert m.cfg.d_model == 48 and m.cfg.max_seq_len == 512 and m.cfg.vocab_size == 256
    assert gpt_config_for(load_config(None, ["model.preset=8b"]).model, 256, 128).vocab_size == 128256
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the tokenizer's vocabulary"):
        build_model(load_config(None, ["model.vocab_size=100"]).model, vocab_size=256, seq_len=64)


def test_hugging_face_model_from_a_local_folder(tmp_path):
    transformers = require_module("transformers")  # model.source=hf
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    mc = load_config(None, ["model.source=hf", f"model.path={tmp_path}", "model.activation_checkpointing=true"]).model
    m = build_model(mc, vocab_size=256, seq_len=32, dtype=torch.float32)
    assert m.vocab_size == 300 and len(m.fsdp_units()) == 2
    x = torch.randint(0, 256, (2, 10))
    assert m(x).shape == (2, 10, 300)
    with pytest.raises(ValueError, match="has 300 token ids but the tokenizer produces 512"):
        build_model(mc, vocab_size=512, seq_len=32)
    from flashoptim_dist.models.hf import load_hf_causal_lm

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_causal_lm(str(tmp_path / "empty"))


def test_hugging_face_sliced_loss(tmp_path):
    """model.loss_chunks > 1 on a Hugging Face Llama: the head becomes an LMHead in place (same
    names, HF's forward unchanged) and the sliced loss equals the cross-entropy of HF's logits;
    architectures outside the supported list are refused by name."""
    transformers = require_module("transformers")
    from flashoptim_dist.models.gpt import LMHead

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    full = build_model(load_config(None, ["model.source=hf", f"model.path={tmp_path / 'llama'}"]).model, 256, 32)
    sliced = build_model(load_config(None, ["model.source=hf", f"model.path={tmp_path / 'llama'}",
                                            "model.loss_chunks=3"]).model, 256, 32)
    assert type(sliced.hf.lm_head) is LMHead and type(full.hf.lm_head) is torch.nn.Linear
    assert list(sliced.state_dict()) == list(full.state_dict())
    x, y = torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 10))
    assert torch.equal(sliced(x), full(x))  # logits unchanged
    la = torch.nn.functional.cross_entropy(full(x).float().reshape(-1, 300), y.reshape(-1))
    lb = sliced(x, targets=y, loss_chunks=3)
    assert torch.allclose(la, lb, rtol=1e-6), (la, lb)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(full.named_parameters(), sliced.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), n
    with pytest.raises(RuntimeError, match="needs enable_sliced_loss"):
        full(x, targets=y, loss_chunks=3)

    g2 = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(g2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not supported for Hugging Face model_type 'gpt2'.*use model.loss_chunks=1"):
        build_model(load_config(None, ["model.source=hf", f"model.path={tmp_path / 'gpt2'}",
                                       "model.loss_chunks=2"]).model, 256, 32)
