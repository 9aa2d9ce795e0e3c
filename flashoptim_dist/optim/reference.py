"""Reference update math of every Flash optimizer family, one segment at a time (pure PyTorch).

This module is the specification of a step: the fused Triton kernel
(:mod:`flashoptim_dist.kernels.fused_step`) performs the same fp32 operations in the same order
and is tested against it; CPU tensors always run this code.

A step on one segment is: decode (θ̂ = merge(θ', ρ), dequantize the moments) → update in fp32,
following ``torch.optim`` exactly → encode (split θ into θ' and ρ, re-quantize the moments).

Hyper-parameters arrive as one fp32 row per segment (``HYPER_COLUMNS``); the host computes
step-dependent values (bias corrections, 1 − lr·wd) in float64 like ``torch.optim`` does and
rounds them to fp32 once, so the reference and the kernel read identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import numerics as nx

__all__ = ["HYPER_COLUMNS", "N_HYPER", "FAMILIES", "SegmentViews", "reference_step_segment"]

#: Number of fp32 hyper-parameter columns per segment.
N_HYPER = 10

#: Column meaning per family (index → name). Unused columns are 0.
HYPER_COLUMNS: Dict[str, tuple] = {
    # decay = 1 − lr·wd (decoupled) or 1; l2 = wd (coupled) or 0; w1 = 1 − β1 (lerp weight);
    # step_size = lr / (1 − β1^t); inv_bc2_sqrt = 1 / sqrt(1 − β2^t); sign = −1 when maximizing.
    "adam": ("decay", "l2", "w1", "beta2", "w2", "eps", "step_size", "inv_bc2_sqrt", "sign", "_"),
    # first = 1.0 on the step that initialises the momentum buffer (torch: buf = clone(grad)).
    "sgd": ("decay", "l2", "momentum", "w_damp", "nesterov", "first", "lr", "_", "sign", "_"),
    "lion": ("decay", "_", "beta1", "w1", "beta2", "w2", "lr", "_", "sign", "_"),
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
    """

    param: torch.Tensor
    grad: torch.Tensor
    rho: Optional[torch.Tensor]
    states: List[torch.Tensor]
    scales: List[Optional[torch.Tensor]]
    phase: int


# -------------------------------------------------------------------------------------------
# fp32 update math, mirroring torch.optim's single-tensor implementations operation by operation


def adam_math(theta, g, m, v, h, decoupled: bool):
    """torch.optim.Adam(W) with fp32 tensors; ``h`` maps hyper names to fp32-valued floats."""
    g = g * h["sign"]
    if decoupled:
        theta = theta * h["decay"]
    else:
        g = g + h["l2"] * theta
    m = m + h["w1"] * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * h["beta2"] + (h["w2"] * g) * g  # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    # torch divides by sqrt(1 − β2^t); multiplying by its reciprocal (computed in float64 on the
    # host) differs by at most one fp32 rounding and saves a division per element on the GPU
    denom = nx.sqrt_rn(v) * h["inv_bc2_sqrt"] + h["eps"]
    theta = theta + ((-h["step_size"]) * m) / denom
    return theta, m, v


def sgd_math(theta, g, buf, h, decoupled: bool):
    """torch.optim.SGD (momentum, dampening, nesterov, coupled decay); SGDW decays decoupled."""
    g = g * h["sign"]
    if decoupled:
        theta = theta * h["decay"]
    else:
        g = g + h["l2"] * theta
    if buf is not None:
        if h["first"] != 0.0:
            buf = g
        else:
            buf = buf * h["momentum"] + h["w_damp"] * g
        g = g + h["momentum"] * buf if h["nesterov"] != 0.0 else buf
    theta = theta + (-h["lr"]) * g
    return theta, buf


def lion_math(theta, g, m, h):
    """Lion (Chen et al. 2023): θ ← θ(1 − ηλ) − η·sign(β1 m + (1−β1) g); m ← β2 m + (1−β2) g."""
    g = g * h["sign"]
    theta = theta * h["decay"]
    c = m * h["beta1"] + h["w1"] * g
    theta = theta + (-h["lr"]) * torch.sign(c)
    m = m * h["beta2"] + h["w2"] * g
    return theta, m


# -------------------------------------------------------------------------------------------


def _decode_state(kind, codes, scales, phase, group_size):
    if scales is None:
        return codes.float()
    if kind == "signed":
        return nx.dequantize_signed(codes, scales, group_size, phase)
    return nx.dequantize_sqrt(codes, scales, group_size, phase)


def _encode_state(kind, value, codes, scales, phase, group_size):
    if scales is None:
        codes.copy_(value)
        return
    fn = nx.quantize_signed if kind == "signed" else nx.quantize_sqrt
    q, s = fn(value, group_size, phase)
    codes.copy_(q)
    scales.copy_(s)


def reference_step_segment(
    family: str,
    decoupled: bool,
    seg: SegmentViews,
    hyper_row: torch.Tensor,
    group_size: int,
) -> None:
    """Update one segment in place: decode → fp32 update → encode."""
    h = {name: float(hyper_row[i]) for i, name in enumerate(HYPER_COLUMNS[family]) if name != "_"}
    theta = nx.merge_master(seg.param, seg.rho)
    g = seg.grad.float()
    kinds = [k for _, k in FAMILIES[family]][: len(seg.states)]
    vals = [_decode_state(k, c, s, seg.phase, group_size) for k, c, s in zip(kinds, seg.states, seg.scales)]
    if family == "adam":
        theta, m, v = adam_math(theta, g, vals[0], vals[1], h, decoupled)
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
        _encode_state(k, value, c, s, seg.phase, group_size)
    if seg.param.dtype == torch.float32:
        seg.param.copy_(theta)
    elif seg.rho is not None:
        p, r = nx.split_master(theta, seg.param.dtype, seg.rho.dtype)
        seg.param.copy_(p)
        seg.rho.copy_(r)
    else:
        seg.param.copy_(theta.to(seg.param.dtype))
