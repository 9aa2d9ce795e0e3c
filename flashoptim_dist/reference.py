"""Reference update math of every Flash optimizer family, one segment at a time (pure PyTorch).

This module is the specification of a step: the fused Triton kernel
(:mod:`flashoptim_dist.kernels.fused_step`) performs the same fp32 operations in the same order
and is tested against it; CPU tensors always run this code.

A step on one segment is: decode (θ̂ = merge(θ', ρ), dequantize the moments) → update in fp32,
following ``torch.optim`` exactly → encode (split θ into θ' and ρ, re-quantize the moments).

Hyper-parameters arrive as one fp32 row per segment (``HYPER_COLUMNS``); the host computes
step-dependent values (bias corrections, 1 − lr·wd) in float64 like ``torch.optim`` does and
rounds them to fp32 once, so the reference and the kernel read identical numbers. The step
count travels in two exact columns (``step_lo`` = step mod 2^24, ``step_hi`` = step div 2^24):
with stochastic rounding it selects the dither of the step (:mod:`flashoptim_dist.numerics`).

**Outlier bound (Adam, quantized moments).** Exact Adam cannot step further than
``R_t = (1−β1)·√(Σ_{j<t} (β1²/β2)^j)·√(1−β2^t)/√(1−β2)`` times ``lr/(1−β1^t)`` per element
(Cauchy–Schwarz on m_t = Σ(1−β1)β1^j g and v_t = Σ(1−β2)β2^j g²; bias corrections included).
Quantized moments can break it: an element whose √v rounds to code 0 in a group dominated by an
outlier, while its m does not, would step by m/ε. The update therefore uses
``max(√v̂·inv_bc2_sqrt + ε, |m|/R_t)`` as its denominator — never active for exact moments,
and the cap on what any group content can do to an element (column ``inv_bound`` = 1/R_t; 0
turns it off, as with fp32 moments, where the update is torch's to the last bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import numerics as nx
from .numerics import fma

__all__ = ["HYPER_COLUMNS", "N_HYPER", "FAMILIES", "SegmentViews", "reference_step_segment", "step_of_row"]

#: Number of fp32 hyper-parameter columns per segment.
N_HYPER = 12
#: Columns every family shares: the gradient sign and the two halves of the step count.
SIGN_COLUMN, STEP_LO_COLUMN, STEP_HI_COLUMN = 8, 10, 11
#: The step count is split at 2^24 so both halves are exact in fp32.
STEP_SPLIT = 1 << 24

#: Column meaning per family (index → name). Unused columns are 0.
HYPER_COLUMNS: Dict[str, tuple] = {
    # decay = 1 − lr·wd (decoupled) or 1; l2 = wd (coupled) or 0; w1 = 1 − β1 (lerp weight);
    # step_size = lr / (1 − β1^t); inv_bc2_sqrt = 1 / sqrt(1 − β2^t); sign = −1 when maximizing;
    # inv_bound = 1/R_t of the outlier bound (module doc), 0 = off.
    "adam": ("decay", "l2", "w1", "beta2", "w2", "eps", "step_size", "inv_bc2_sqrt", "sign", "inv_bound",
             "step_lo", "step_hi"),
    # first = 1.0 on the step that initialises the momentum buffer (torch: buf = clone(grad)).
    "sgd": ("decay", "l2", "momentum", "w_damp", "nesterov", "first", "lr", "_", "sign", "_", "step_lo", "step_hi"),
    "lion": ("decay", "_", "beta1", "w1", "beta2", "w2", "lr", "_", "sign", "_", "step_lo", "step_hi"),
}

#: State slots per family: (name, kind) with kind "signed" (int8 compander) or "sqrt" (uint8).
FAMILIES: Dict[str, tuple] = {
    "adam": (("exp_avg", "signed"), ("exp_avg_sq", "sqrt")),
    "sgd": (("momentum_buffer", "signed"),),
    "lion": (("exp_avg", "signed"),),
}


@dataclass
class SegmentViews:
    """1-D views of one segment's storage (all of ``length`` elements except the scales).

    ``states[i]`` is the int8/uint8 code view (quantized) or the fp32 view; ``scales[i]`` the
    bf16 scales of the canonical groups the segment touches (``None`` when not quantized).
    ``global_start`` is the canonical index of the first element (``phase`` = it mod G) and
    ``key`` the parameter's dither identity (:func:`~flashoptim_dist.numerics.parameter_key`);
    both matter only with stochastic rounding.
    """

    param: torch.Tensor
    grad: torch.Tensor
    rho: Optional[torch.Tensor]
    states: List[torch.Tensor]
    scales: List[Optional[torch.Tensor]]
    phase: int
    global_start: int = 0
    key: int = 0


# -------------------------------------------------------------------------------------------
# fp32 update math, mirroring torch.optim's single-tensor implementations operation by operation,
# except that a multiply followed by an add is one fused multiply-add (numerics.fma: one
# rounding instead of two, as the GPU's FFMA; torch's own CUDA kernels are compiled with FMA
# contraction too). The kernel saves one instruction per element for each (docs/PERFORMANCE.md).


def adam_math(theta, g, m, v, h, decoupled: bool, bounded: bool = False):
    """torch.optim.Adam(W) with fp32 tensors; ``h`` maps hyper names to fp32-valued floats.
    ``bounded`` (quantized moments) applies the outlier bound of the module doc."""
    g = g * h["sign"]
    if not decoupled:
        g = fma(h["l2"], theta, g)
    m = fma(h["w1"], g - m, m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = fma(h["w2"] * g, g, v * h["beta2"])  # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    # torch divides by sqrt(1 − β2^t); multiplying by its reciprocal (computed in float64 on the
    # host) differs by at most one fp32 rounding and saves a division per element on the GPU
    # (√v for v ≥ 2^-101, v itself below: numerics.SQRT_V_MIN says why)
    denom = fma(nx.sqrt_v(v), h["inv_bc2_sqrt"], h["eps"])
    if bounded:  # the outlier bound (module doc); NaN propagates as in the kernel
        denom = torch.maximum(denom, m.abs() * h["inv_bound"])
    upd = ((-h["step_size"]) * m) / denom
    theta = fma(theta, h["decay"], upd) if decoupled else theta + upd
    return theta, m, v


def sgd_math(theta, g, buf, h, decoupled: bool):
    """torch.optim.SGD (momentum, dampening, nesterov, coupled decay); SGDW decays decoupled."""
    g = g * h["sign"]
    if decoupled:
        theta = theta * h["decay"]
    else:
        g = fma(h["l2"], theta, g)
    if buf is not None:
        if h["first"] != 0.0:
            buf = g
        else:
            buf = fma(buf, h["momentum"], h["w_damp"] * g)
        g = fma(h["momentum"], buf, g) if h["nesterov"] != 0.0 else buf
    theta = fma(-h["lr"], g, theta)
    return theta, buf


def lion_math(theta, g, m, h):
    """Lion (Chen et al. 2023): θ ← θ(1 − ηλ) − η·sign(β1 m + (1−β1) g); m ← β2 m + (1−β2) g."""
    g = g * h["sign"]
    c = fma(m, h["beta1"], h["w1"] * g)
    theta = fma(theta, h["decay"], (-h["lr"]) * torch.sign(c))
    m = fma(m, h["beta2"], h["w2"] * g)
    return theta, m


# -------------------------------------------------------------------------------------------


def _decode_state(kind, codes, scales, phase, group_size):
    if scales is None:
        return codes.float()
    if kind == "signed":
        return nx.dequantize_signed(codes, scales, group_size, phase)
    return nx.dequantize_sqrt(codes, scales, group_size, phase)


def _encode_state(kind, value, codes, scales, phase, group_size, words):
    if scales is None:
        codes.copy_(value)
        return
    if kind == "signed":
        q, s = nx.quantize_signed(value, group_size, phase, None if words is None else nx.dither_field(words, "m"))
    else:
        q, s = nx.quantize_sqrt(value, group_size, phase, None if words is None else nx.dither_field(words, "v"))
    codes.copy_(q)
    scales.copy_(s)


def step_of_row(h: Dict[str, float]) -> int:
    """The step count carried by a hyper row (``step_lo`` + ``step_hi``·2^24)."""
    return int(h["step_lo"]) + int(h["step_hi"]) * STEP_SPLIT


def reference_step_segment(
    family: str,
    decoupled: bool,
    seg: SegmentViews,
    hyper_row: torch.Tensor,
    group_size: int,
    stochastic: bool = False,
) -> None:
    """Update one segment in place: decode → fp32 update → encode (codes and ρ rounded with the
    segment's dither when ``stochastic``, to nearest otherwise)."""
    h = {name: float(hyper_row[i]) for i, name in enumerate(HYPER_COLUMNS[family]) if name != "_"}
    words = None
    if stochastic:
        index = torch.arange(seg.global_start, seg.global_start + seg.param.numel(), dtype=torch.int64,
                             device=seg.param.device)
        words = nx.dither_words(index, nx.segment_salt(seg.key, step_of_row(h)))
    theta = nx.merge_master(seg.param, seg.rho)
    g = seg.grad.float()
    kinds = [k for _, k in FAMILIES[family]][: len(seg.states)]
    vals = [_decode_state(k, c, s, seg.phase, group_size) for k, c, s in zip(kinds, seg.states, seg.scales)]
    if family == "adam":
        theta, m, v = adam_math(theta, g, vals[0], vals[1], h, decoupled, bounded=seg.scales[0] is not None)
        new = [m, v]
    elif family == "sgd":
        theta, buf = sgd_math(theta, g, vals[0] if vals else None, h, decoupled)
        new = [buf] if vals else []
    elif family == "lion":
        theta, m = lion_math(theta, g, vals[0], h)
        new = [m]
    else:  # pragma: no cover - guarded by the optimizer classes
        raise ValueError(f"unknown optimizer family {family!r}")
    for k, value, c, s in zip(kinds, new, seg.states, seg.scales):
        _encode_state(k, value, c, s, seg.phase, group_size, words)
    if seg.param.dtype == torch.float32:
        seg.param.copy_(theta)
    elif seg.rho is not None:
        if seg.param.dtype == torch.bfloat16:  # the bit split: 8 dither bits, int16 exact
            field = "rho" if seg.rho.dtype == torch.int8 else None
        else:
            field = "rho_fp16" if seg.rho.dtype == torch.int8 else "rho16"
        dither = None if words is None or field is None else nx.dither_field(words, field)
        p, r = nx.split_master(theta, seg.param.dtype, seg.rho.dtype, dither)
        seg.param.copy_(p)
        seg.rho.copy_(r)
    else:
        seg.param.copy_(theta.to(seg.param.dtype))
