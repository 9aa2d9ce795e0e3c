"""Model FLOPs per token and model-FLOPs utilisation (MFU), counted the way torchtitan counts them.

torchtitan (``get_dense_model_nparams_and_flops`` in its model utilities, read 2026-12) reports

    flops/token = 6 · (N − N_embedding) + 12 · L · H · Q · T

N the model's parameters, N_embedding those of its ``nn.Embedding`` modules (a lookup does no
matmul; a head tied to the embedding therefore drops out too), L layers, H attention heads, Q the
head size and T the sequence length. 6N is forward (2N) plus backward (4N) of every weight
matmul; 12·L·H·Q·T the two attention matmuls (QKᵀ and PV), forward and backward, without
halving for the causal mask. Recomputation (activation checkpointing) is *not* counted: MFU
measures useful work, so checkpointing lowers it. MFU = flops/token × tokens/s ÷ (peak × ranks),
with the card's dense bf16 peak from its data sheet — not the rate a matmul reaches on it
(docs/PERFORMANCE.md quotes both where it reports MFU).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models import count_params

#: Dense (no sparsity) bf16 tensor-core peak in FLOP/s by device-name substring, first match
#: wins. NVIDIA data sheets: H100/H200 SXM 989.4 TFLOP/s (the H200 is the H100's GH100 die
#: with more and faster memory), H100 PCIe 756, H100 NVL 835, A100 312. torchtitan uses the same
#: numbers for the H100 variants and the A100.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def attention_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """(layers, heads, head size) of the built-in GPT or a Hugging Face decoder; None otherwise."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and all(hasattr(cfg, k) for k in ("n_layers", "n_heads", "head_dim")):
        return int(cfg.n_layers), int(cfg.n_heads), int(cfg.head_dim)
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "num_hidden_layers") and hasattr(hf, "num_attention_heads"):
        heads = int(hf.num_attention_heads)
        head_dim = getattr(hf, "head_dim", None) or int(hf.hidden_size) // heads
        return int(hf.num_hidden_layers), heads, int(head_dim)
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> Optional[float]:
    """torchtitan's count (module docstring) for ``model`` (before any engine wraps it; a model on
    the meta device works: only shapes are read). None for a model whose attention shape is unknown."""
    shape = attention_shape(model)
    if shape is None:
        return None
    emb = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    layers, heads, head_dim = shape
    n = count_params(model)  # tied weights once: a head tied to the embedding is the embedding's
    return 6.0 * (n - sum(emb.values())) + 12.0 * layers * heads * head_dim * seq_len


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one ``device``: ``override_tflops`` × 10^12 when given, else from
    :data:`PEAK_BF16_FLOPS` by the CUDA device name; None on CPU or for an unknown card."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(flops_token: Optional[float], tokens_per_s: float, peak: Optional[float], ranks: int) -> Optional[float]:
    """Model-FLOPs utilisation in [0, 1] of ``ranks`` devices processing ``tokens_per_s`` in all."""
    if flops_token is None or peak is None or ranks < 1:
        return None
    return flops_token * tokens_per_s / (peak * ranks)
