"""Partial groups made canonical: the one implementation behind every writer of Flash state.

A quantization group that a shard boundary cuts (docs/design.md §3, :mod:`flashoptim_dist.layout`)
has one scale per side at run time: each side quantizes its elements against the absmax of its
own part. Whatever leaves the optimizer for another sharding — a
:mod:`flashoptim_dist.checkpoint` directory, or ``FlashOptimizer.state_dict()`` over DTensor
parameters — must not depend on where the boundaries were, so the sides agree on one scale
first: the **largest** (the canonical absmax of the whole group; every code of the group stays
within its range) and the side whose scale was smaller re-expresses its codes against it
(:func:`requantize`: dequantize with the old scale, quantize with the agreed one, at most half a
code step of the agreed scale away). The live optimizer state is never modified.

How the sides exchange their scales is the caller's business (``checkpoint.save`` gathers them
with the save's metadata; ``state_dict()`` all-reduces them over the parameter's mesh); this
module only says which groups are cut (:func:`cut_groups`) and rewrites a run's codes and
scales once the agreed scales are known (:func:`canonical_run`).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from . import numerics as nx

__all__ = ["cut_groups", "requantize", "canonical_run"]


def cut_groups(global_start: int, length: int, numel: int, group_size: int) -> List[int]:
    """Canonical groups that the run ``[global_start, global_start + length)`` of a parameter of
    ``numel`` elements shares with another run (its first and last group when a boundary cuts
    them). A parameter's last group may be short: its end is not a cut."""
    G = group_size
    end = global_start + length
    out = []
    if length <= 0:
        return out
    if global_start % G:
        out.append(global_start // G)
    if end % G and end != numel:
        g = (end - 1) // G
        if g not in out:
            out.append(g)
    return out


def _fixed_signed(values: torch.Tensor, scale: float) -> torch.Tensor:
    """Companded int8 codes of fp32 ``values`` against a given scale (same formula as
    :func:`flashoptim_dist.numerics.quantize_signed`)."""
    if scale <= 0:
        return torch.zeros(values.shape, dtype=torch.int8)
    xn = nx.true_div(values.float(), scale)
    y = (xn + xn) / (1.0 + xn.abs())
    q = torch.floor(y * float(nx.SIGNED_LEVELS) + 0.5)
    return q.clamp(-nx.SIGNED_LEVELS, nx.SIGNED_LEVELS).to(torch.int8)


def _fixed_sqrt(values: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 codes of √v for fp32 ``values`` = v against a given scale (as quantize_sqrt)."""
    if scale <= 0:
        return torch.zeros(values.shape, dtype=torch.uint8)
    r = nx.sqrt_rn(values.float().clamp(min=0))
    xn = nx.true_div(r, scale)
    q = torch.floor(xn * float(nx.UNSIGNED_LEVELS) + 0.5)
    return q.clamp(0, nx.UNSIGNED_LEVELS).to(torch.uint8)


def requantize(codes: torch.Tensor, kind: str, s_old: torch.Tensor, s_new: torch.Tensor, group_size: int,
               phase: int) -> torch.Tensor:
    """Re-express the codes of (part of) one group quantized with scale ``s_old`` against the
    agreed scale ``s_new`` (>= s_old). Both scales are 1-element bf16 tensors; ``phase`` is the
    position of the first code inside its group. Returns CPU codes."""
    c = codes.detach().cpu()
    if kind == "signed":
        vals = nx.dequantize_signed(c, s_old.cpu().reshape(1), group_size, phase)
        return _fixed_signed(vals, float(s_new))
    vals = nx.dequantize_sqrt(c, s_old.cpu().reshape(1), group_size, phase)
    return _fixed_sqrt(vals, float(s_new))


def canonical_run(codes: torch.Tensor, scales: torch.Tensor, kind: str, global_start: int, numel: int,
                  group_size: int, agreed: Callable[[int], Optional[float]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales of one run of a parameter as they are written: for every cut group
    of the run whose agreed scale (``agreed(group index)``, None when unknown) differs from the
    run's own, the scale is replaced and the run's codes of that group re-expressed against it.

    ``codes``: the run's codes (``length`` of them); ``scales``: one bf16 scale per group the run
    touches (``num_groups(length, global_start % G, G)``), in group order. Returns new tensors
    only where something changed (the inputs themselves otherwise), on the inputs' devices.
    """
    G = group_size
    n = codes.numel()
    g0 = global_start // G
    out_c, out_s = codes, scales
    for g in cut_groups(global_start, n, numel, G):
        s_new = agreed(g)
        s_loc = scales[g - g0 : g - g0 + 1]
        if s_new is None or s_new == float(s_loc):
            continue
        if out_c is codes:
            out_c, out_s = codes.clone(), scales.clone()
        a, b = max(global_start, g * G), min(global_start + n, (g + 1) * G)
        s_new_t = torch.tensor([s_new], dtype=torch.bfloat16)
        piece = requantize(codes[a - global_start : b - global_start], kind, s_loc, s_new_t, G, a % G)
        out_c[a - global_start : b - global_start] = piece.to(out_c.device)
        out_s[g - g0] = s_new
    return out_c, out_s
