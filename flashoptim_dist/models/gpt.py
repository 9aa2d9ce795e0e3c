"""A compact decoder-only transformer (GPT family) with Llama-style options.

Architecture, per block (pre-norm)::

    x = x + Attn(Norm(x))      # causal multi-head attention, optional grouped-query (GQA)
    x = x + MLP(Norm(x))       # SwiGLU (W2(silu(W1 x) * W3 x)) or GELU (W2 gelu(W1 x))

Positions are rotary (RoPE, applied to q and k, computed on the fly in fp32, so nothing
position-dependent is stored in the state dict) or learned absolute embeddings. Norms are
RMSNorm or LayerNorm, computed in fp32 and cast back to the input dtype. Linear layers have no
bias. The head is optionally tied to the token embedding.

Initialisation (:meth:`GPT.init_weights`): normal(0, init_std) for embeddings and linears, the
two residual output projections (attention ``wo`` and MLP ``w2``) scaled by
``1/sqrt(2 * n_layers)``, norm weights one. The same method re-initialises a model that was built
on the ``meta`` device and materialised with ``to_empty`` (also on FSDP2-sharded DTensors).

The list of blocks is ``model.blocks``; :meth:`GPT.fsdp_units` returns them so engines can wrap
one FSDP unit per block.

``forward(idx, targets=..., loss_chunks=k)`` returns the mean next-token cross-entropy instead
of the logits, computing head and loss over k slices of the tokens, each recomputed in backward:
the (B, T, V) logits, their fp32 copy, log-softmax and gradient (B·T·V·14 bytes together, 0.85 GiB
at 2×1024 tokens and V = 32000) then never exist at once, only one slice of them. At large
vocabularies they are the largest activation of a step with activation checkpointing
(docs/PERFORMANCE.md). Head and sliced loss are one call of the head module
(:class:`LMHead`), so the head can be an FSDP unit of its own (:meth:`GPT.fsdp_embedding_units`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GPTConfig", "GPT", "LMHead", "PRESETS", "preset", "RMSNorm"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape and options of a :class:`GPT`."""

    vocab_size: int = 256
    """Number of token ids (256 for the byte-level tokenizer)."""
    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of attention (query) heads; must divide d_model."""
    n_kv_heads: Optional[int] = None
    """Number of key/value heads for grouped-query attention; None means n_heads (plain MHA)."""
    d_ff: Optional[int] = None
    """Hidden width of the MLP; None means 4*d_model for GELU and a multiple of 64 near 8/3*d_model for SwiGLU."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (sizes the learned position table; RoPE has no table)."""
    norm: str = "rmsnorm"
    """Normalisation: 'rmsnorm' or 'layernorm'."""
    pos_embedding: str = "rope"
    """Positions: 'rope' (rotary) or 'learned' (absolute table)."""
    mlp: str = "swiglu"
    """MLP type: 'swiglu' or 'gelu'."""
    tie_embeddings: bool = False
    """Share the output head's weight with the token embedding."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 3 uses 500000)."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""

    def __post_init__(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        kv = self.kv_heads
        if self.n_heads % kv:
            problems.append(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        if self.pos_embedding == "rope" and (self.d_model // self.n_heads) % 2:
            problems.append(
                f"rotary positions need an even head size, got d_model/n_heads={self.d_model // self.n_heads}"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            problems.append(f"norm={self.norm!r}: allowed 'rmsnorm', 'layernorm'")
        if self.pos_embedding not in ("rope", "learned"):
            problems.append(f"pos_embedding={self.pos_embedding!r}: allowed 'rope', 'learned'")
        if self.mlp not in ("swiglu", "gelu"):
            problems.append(f"mlp={self.mlp!r}: allowed 'swiglu', 'gelu'")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid GPT shape: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        """Hidden width of the MLP actually used."""
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def num_params(self) -> int:
        """Exact number of parameters of a model of this shape (no allocation)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads * hd) + 2 * d * (self.kv_heads * hd) + (self.n_heads * hd) * d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * self.ff_dim
        norm = d if self.norm == "rmsnorm" else 2 * d
        block = attn + mlp + 2 * norm
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        pos = self.max_seq_len * d if self.pos_embedding == "learned" else 0
        return self.n_layers * block + emb + head + pos + norm

    def to_dict(self) -> dict:
        """Plain dict of the fields."""
        return asdict(self)


#: Size presets. ``vocab_size`` 256 means "byte-level"; the builder replaces it with the
#: tokenizer's vocabulary when the preset does not fix one (see :func:`preset`).
PRESETS: dict[str, GPTConfig] = {
    # CPU-friendly sizes.
    "tiny": GPTConfig(d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=256),
    "mini": GPTConfig(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=512),
    "small": GPTConfig(d_model=256, n_layers=6, n_heads=8, d_ff=704, max_seq_len=1024),
    # GPT-2-small-like width/depth with Llama-style blocks.
    "125m": GPTConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=2048),
    "350m": GPTConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, d_ff=2816, max_seq_len=2048),
    # Llama-3.2-1B-like.
    "1b": GPTConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        max_seq_len=8192, tie_embeddings=True, rope_theta=500000.0,
    ),
    # Llama-3.2-3B-like.
    "3b": GPTConfig(
        vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
        max_seq_len=8192, tie_embeddings=True, rope_theta=500000.0,
    ),
    # Llama-3-8B-like.
    "8b": GPTConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_seq_len=8192, tie_embeddings=False, rope_theta=500000.0,
    ),
}

#: Presets whose vocabulary follows the tokenizer (the small byte-level ones).
_TOKENIZER_VOCAB_PRESETS = {"tiny", "mini", "small"}


def preset(name: str, **overrides) -> GPTConfig:
    """Return preset ``name`` with ``overrides`` applied (None values are ignored)."""
    if name not in PRESETS:
        raise KeyError(f"unknown GPT preset {name!r}; allowed: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32: ``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input/parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else _LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def _rope(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate pairs (x[..., :hd/2], x[..., hd/2:]) ("rotate half" convention).
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with optional grouped-query heads and rotary positions."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        # heads counted from the projections' outputs (-1): under tensor parallelism each rank's
        # wq/wk/wv give it n_heads/tp and kv_heads/tp of them (GPT.tensor_parallel_plan)
        q = self.wq(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        if cfg.pos_embedding == "rope":
            # Computed here, in fp32, rather than passed in: an FSDP2 mixed-precision policy
            # would cast a block's floating inputs (the tables) to bf16.
            rope = _rope(t, cfg.head_dim, cfg.rope_theta, x.device)
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cfg.kv_heads != cfg.n_heads:
            rep = cfg.n_heads // cfg.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU (``w2(silu(w1 x) * w3 x)``) or GELU (``w2(gelu(w1 x))``) feed-forward."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """One pre-norm transformer block: attention then MLP, each with a residual connection.

    With ``activation_checkpointing`` the block's body is recomputed in backward. The checkpoint
    sits inside ``forward`` so that an FSDP unit wrapping the block gathers parameters and casts
    inputs once, outside the recomputed region.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.activation_checkpointing = cfg.activation_checkpointing
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class LMHead(nn.Linear):
    """Output projection (d_model -> vocab, no bias) that can also return the loss.

    ``head(h)`` gives the logits. ``head(h, targets, loss_chunks)`` gives the summed fp32
    cross-entropy, computing logits and loss over ``loss_chunks`` slices of the tokens, each slice
    recomputed in backward. Head and loss are one module call so that the head can be an FSDP unit
    of its own: FSDP2 gathers its weight once for the forward and once for the backward, and the
    recomputed slices read ``self.weight`` while it is gathered (calling ``self`` per slice would
    run FSDP's hooks once per slice).

    Memory for T tokens and vocabulary V: bf16 logits (2 B), their fp32 copy, log-softmax and
    its gradient (4 B each) exist for T/k tokens at a time, ~14·T·V/k bytes instead of ~14·T·V
    (7 GiB at T = 4096, V = 128256, k = 1; measured three 2004 MiB fp32 buffers at the peak);
    the cost is a second forward of the head per step."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)

    def _loss_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.weight).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None, loss_chunks: int = 1) -> torch.Tensor:
        if targets is None:
            return F.linear(h, self.weight)
        if loss_chunks == 1:
            return self._loss_sum(h, targets)
        # slices of the flattened tokens; each slice's logits are recomputed in backward (and
        # without autograd, e.g. in evaluation, exist one slice at a time all the same)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        grad = torch.is_grad_enabled()
        return sum(
            checkpoint(self._loss_sum, hs, ts, use_reentrant=False) if grad else self._loss_sum(hs, ts)
            for hs, ts in zip(h.chunk(loss_chunks), targets.chunk(loss_chunks))
        )


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx)`` maps token ids (B, T) to logits (B, T, V),
    ``forward(idx, targets, loss_chunks)`` to the mean cross-entropy (see the module doc)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_embedding == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.head = LMHead(cfg.d_model, cfg.vocab_size)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter as described in the module docstring."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, 0.0, std)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, 0.0, std)
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.mlp.w1, block.mlp.w3):
                if lin is not None:
                    nn.init.normal_(lin.weight, 0.0, std)
            nn.init.normal_(block.attn.wo.weight, 0.0, resid_std)
            nn.init.normal_(block.mlp.w2.weight, 0.0, resid_std)
            for norm in (block.attn_norm, block.mlp_norm):
                norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, std)

    def tie_weights(self) -> None:
        """With ``tie_embeddings``: make the head's weight the token embedding's (again: moving a
        meta-built model with ``to_empty`` gives each module a parameter of its own)."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @torch.no_grad()
    def replay_constructor_rng(self) -> None:
        """Draw from the CPU generator what building this model on the CPU draws before
        :meth:`init_weights` — the default initialisation (``reset_parameters``) of every module
        with parameters, in construction order, on a throw-away fp32 CPU copy of that one module —
        and keep none of it.

        For a model built on the ``meta`` device: ``replay_constructor_rng()``, then
        ``to_empty(device='cpu')`` and ``init_weights()`` leave exactly the weights (and the CPU
        generator state) that ``GPT(cfg)`` built on the CPU from the same seed has, cast to the
        parameters' dtype (bf16 from ``normal_`` equals fp32 ``normal_`` rounded on the CPU). Memory:
        one module's fp32 weights at a time (the largest is the embedding or the head), never the
        model's."""
        for m in self.modules():
            if next(m.parameters(recurse=False), None) is None or not hasattr(m, "reset_parameters"):
                continue
            if any(True for _ in m.children()):  # pragma: no cover - GPT's modules with parameters are leaves
                raise TypeError(f"{type(m).__name__} has parameters and sub-modules; cannot replay its initialisation")
            if not all(p.is_meta for p in m.parameters(recurse=False)):
                raise ValueError("replay_constructor_rng is for a model built on the meta device")
            copy.deepcopy(m).float().to_empty(device="cpu").reset_parameters()

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules to shard as separate FSDP units (one per block)."""
        return list(self.blocks)

    def tensor_parallel_plan(self) -> dict:
        """torchtitan's Llama plan for ``torch.distributed.tensor.parallel.parallelize_module``
        (without sequence parallelism): attention ``wq``/``wk``/``wv`` and MLP ``w1``/``w3``
        colwise (weights ``Shard(0)``: each rank computes n_heads/tp heads and d_ff/tp hidden
        units), ``wo``/``w2`` rowwise (weights ``Shard(1)``, outputs all-reduced), the token
        embedding rowwise (table ``Shard(0)`` by vocabulary), the head colwise with its logits
        gathered (``output_layouts=Replicate()``). Norms and learned positions stay replicated
        over the tensor-parallel dim (FSDP shards them over the data-parallel dim).

        Needs n_heads, kv_heads, ff_dim and vocab_size divisible by tp (local shards are handed
        between layers as plain tensors whose global shape DTensor takes as local × tp) and an
        untied head (the embedding and the head split the shared table differently). Memory per
        rank: each split weight 1/tp (and 1/dp under FSDP on top); the gathered logits are
        B·T·V as without TP."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan = {
            "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Replicate()),
        }
        for i, block in enumerate(self.blocks):
            for name in ("wq", "wk", "wv"):
                plan[f"blocks.{i}.attn.{name}"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.wo"] = RowwiseParallel()
            plan[f"blocks.{i}.mlp.w1"] = ColwiseParallel()
            if block.mlp.w3 is not None:
                plan[f"blocks.{i}.mlp.w3"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.w2"] = RowwiseParallel()
        return plan

    def tensor_parallel_problems(self, tp: int, group_size: int = 0) -> list[str]:
        """Why :meth:`tensor_parallel_plan` cannot split this model ``tp`` ways (empty: it can).
        With ``group_size`` (a Flash optimizer's), also the rowwise weights whose column pieces
        would cut quantization groups (flashoptim_dist.placements refuses those)."""
        cfg, out = self.cfg, []
        for what, n in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.kv_heads),
                        ("model.d_ff", cfg.ff_dim), ("model.vocab_size", cfg.vocab_size)):
            if n % tp:
                out.append(f"{what}={n} is not divisible by engine.tp_size={tp}")
        if cfg.tie_embeddings:
            out.append("the head is tied to the token embedding (model.tie_embeddings=true): the embedding splits the "
                       "shared table rowwise for lookups, the head colwise; set model.tie_embeddings=false")
        if group_size and not out:
            for what, cols in (("attn.wo", cfg.n_heads * cfg.head_dim), ("mlp.w2", cfg.ff_dim)):
                if (cols // tp) % group_size:
                    out.append(f"blocks.*.{what} ({cols} columns) splits into {cols // tp} columns per rank, "
                               f"not a multiple of the Flash optimizer's group size {group_size}")
        return out

    def fsdp_embedding_units(self) -> list[nn.Module]:
        """Token embedding and output head, to shard as FSDP units of their own; none when the
        head is tied to the embedding (a shared weight must stay in one unit)."""
        return [] if self.cfg.tie_embeddings else [self.tok_emb, self.head]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, loss_chunks: int = 1) -> torch.Tensor:
        b, t = idx.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds model max_seq_len={self.cfg.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        h = self.norm(x)
        if targets is None:
            return self.head(h)
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of the input ids {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        if not isinstance(loss_chunks, int) or loss_chunks < 1:
            raise ValueError(f"loss_chunks must be a positive int, got {loss_chunks!r}")
        return self.head(h, targets, loss_chunks) / targets.numel()
