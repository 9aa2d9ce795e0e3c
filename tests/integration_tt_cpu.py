"""A torchtitan override used by the CPU tests only: causal SDPA instead of FlexAttention.

torchtitan 0.3.0's language models use FlexAttention (or varlen, CUDA-only) and torch 2.13's
FlexAttention has no backward on CPU ("FlexAttention does not support backward on CPU").
torchtitan's own override mechanism swaps the attention config; with one document per row (the
tests' batches) causal SDPA computes the same attention as the block-causal flex mask.
"""

from torchtitan.config.override import override
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention


@override(target=FlexAttention.Config, description="CPU tests: causal SDPA (FlexAttention has no CPU backward)")
def causal_sdpa(cfg: FlexAttention.Config) -> ScaledDotProductAttention.Config:
    return ScaledDotProductAttention.Config()
