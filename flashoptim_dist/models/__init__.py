"""Models for the trainer: the built-in GPT family and Hugging Face causal LMs.

:func:`build_model` turns a :class:`flashoptim_dist.train.config.ModelConfig` into a module
with the trainer's interface: ``forward(idx) -> logits`` and ``fsdp_units()``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .gpt import GPT, PRESETS, GPTConfig, RMSNorm, preset
from .gpt import _TOKENIZER_VOCAB_PRESETS

__all__ = ["GPT", "GPTConfig", "PRESETS", "RMSNorm", "preset", "gpt_config_for", "build_model", "count_params"]


def gpt_config_for(model_cfg, vocab_size: int, seq_len: int) -> GPTConfig:
    """The :class:`GPTConfig` that ``model_cfg`` (a ModelConfig) describes.

    The preset's vocabulary is replaced by the tokenizer's ``vocab_size`` for the small
    byte-level presets (tiny, mini, small) unless ``model_cfg.vocab_size`` is set; large presets
    keep their own (e.g. 128256) as long as it covers the tokenizer. ``max_seq_len`` is raised
    to ``seq_len`` if the preset is shorter.
    """
    overrides = dict(
        vocab_size=model_cfg.vocab_size,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        n_kv_heads=model_cfg.n_kv_heads,
        d_ff=model_cfg.d_ff,
        max_seq_len=model_cfg.max_seq_len,
        norm=model_cfg.norm,
        pos_embedding=model_cfg.pos_embedding,
        mlp=model_cfg.mlp,
        tie_embeddings=model_cfg.tie_embeddings,
        activation_checkpointing=model_cfg.activation_checkpointing,
    )
    if model_cfg.vocab_size is None and model_cfg.preset in _TOKENIZER_VOCAB_PRESETS:
        overrides["vocab_size"] = vocab_size
    cfg = preset(model_cfg.preset, **overrides)
    if cfg.max_seq_len < seq_len and model_cfg.max_seq_len is None:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    return cfg


def build_model(model_cfg, vocab_size: int, seq_len: int, meta: bool = False,
                dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build the model a ModelConfig describes.

    ``vocab_size``: the tokenizer's vocabulary (the model's must be at least as large).
    ``meta``: build on the meta device (materialise later with ``to_empty`` + ``init_weights``).
    ``dtype``: for Hugging Face models, the dtype to load weights in.
    """
    if model_cfg.source == "hf":
        from .hf import load_hf_causal_lm

        model = load_hf_causal_lm(
            model_cfg.path, dtype=dtype, activation_checkpointing=model_cfg.activation_checkpointing, meta=meta
        )
        if model_cfg.loss_chunks > 1:
            model.enable_sliced_loss()
        if model.vocab_size < vocab_size:
            raise ValueError(
                f"the model at model.path={model_cfg.path!r} has {model.vocab_size} token ids but the tokenizer "
                f"produces {vocab_size}; use data.tokenizer=hf or a model with a larger vocabulary"
            )
        return model
    cfg = gpt_config_for(model_cfg, vocab_size, seq_len)
    if cfg.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}); "
            f"set model.vocab_size>={vocab_size}"
        )
    if cfg.max_seq_len < seq_len:
        raise ValueError(f"model.max_seq_len={cfg.max_seq_len} is shorter than data.seq_len={seq_len}; raise it")
    if meta:
        with torch.device("meta"):
            return GPT(cfg)
    return GPT(cfg)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once; global shape for DTensors)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
