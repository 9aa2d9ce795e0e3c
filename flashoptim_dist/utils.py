"""Model helpers: casting to a narrow dtype while keeping chosen layers in fp32; byte counts for people."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

__all__ = ["cast_model", "fmt_bytes"]


def _keeps_running_stats(module: nn.Module) -> bool:
    # BatchNorm-style layers accumulate running mean/var over many steps: bf16 would lose them
    return isinstance(module, nn.modules.batchnorm._NormBase) and getattr(module, "track_running_stats", False)


def cast_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_fp32: Sequence[str] = ()) -> nn.Module:
    """Cast floating params and buffers of ``model`` to ``dtype`` in place and return it.

    Kept in fp32: norm layers with running statistics (BatchNorm/InstanceNorm with
    ``track_running_stats``) and every module or parameter whose qualified name matches one of
    the shell-style ``keep_fp32`` patterns (e.g. ``["lm_head", "*.norm*"]``).

    Flash optimizers keep fp32-free masters for narrow params (ρ restores the lost bits), so the
    cast halves parameter memory without losing update precision. Under FSDP2 put layers kept in
    fp32 in their own ``fully_shard`` unit: one unit must hold one dtype.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"cast_model casts to bfloat16, float16 or float32, got {dtype}")
    patterns = list(keep_fp32)

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

    kept = set()
    for name, module in model.named_modules():
        if _keeps_running_stats(module) or (name and matches(name)):
            kept.add(name)

    def under_kept(qualname: str) -> bool:
        parts = qualname.split(".")
        return any(".".join(parts[:i]) in kept for i in range(0, len(parts)))

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            target = torch.float32 if (under_kept(name) or matches(name)) else dtype
            if param.dtype != target:
                param.data = param.data.to(target)
        for name, buf in model.named_buffers():
            if buf is None or not buf.is_floating_point():
                continue
            target = torch.float32 if (under_kept(name) or matches(name)) else dtype
            if buf.dtype != target:
                mod_name, _, buf_name = name.rpartition(".")
                mod = model.get_submodule(mod_name) if mod_name else model
                mod._buffers[buf_name] = buf.to(target)
    return model


def fmt_bytes(n: float, sep: str = " ") -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"1.5 KiB"`` … ``"TiB"`` (one decimal above bytes);
    ``sep`` goes between number and unit (the trainer's log lines use ``""``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{sep}{unit}" if unit == "B" else f"{n:.1f}{sep}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover (the loop returns at TiB)
