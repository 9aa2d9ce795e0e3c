"""State tensors of a Flash optimizer: their creation, validation on load, and conversion from
and to plain fp32 moments (torch.optim interop). Used by :mod:`.base`; the state_dict forms
themselves are :mod:`.state_io`'s."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import layout as lay
from .. import numerics as nx
from ..config import FlashConfig
from . import state_io
from ..reference import FAMILIES


def allocate_state(layout: lay.StateLayout, family: str, n_states: int, device) -> Dict[str, Any]:
    """Zero state of one optimizer tensor in its stored dtypes (see :mod:`.base`'s table):
    ``step`` 0, ``rho`` (int8/int16) when the layout keeps one, and per moment either int8/uint8
    codes + bf16 scales (quantized) or fp32 values. The one place that decides state dtypes."""
    n = layout.numel
    state: Dict[str, Any] = {"step": 0}
    if layout.rho_dtype is not None:
        state["rho"] = torch.zeros(n, dtype=layout.rho_dtype, device=device)
    for name, kind in FAMILIES[family][:n_states]:
        if layout.quantized:
            dt = torch.int8 if kind == "signed" else torch.uint8
            state[name] = torch.zeros(n, dtype=dt, device=device)
            state[name + "_scales"] = torch.zeros(layout.n_scales, dtype=torch.bfloat16, device=device)
        else:
            state[name] = torch.zeros(n, dtype=torch.float32, device=device)
    return state


def check_flash_meta(meta: dict, opt, max_version: int) -> None:
    """Refuse a Flash state dict's ``"flashoptim"`` entry that ``opt`` cannot load exactly: an
    unknown format version, another optimizer family, or another numeric layout."""
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= max_version:
        raise ValueError(
            f"optimizer state format version {version} is not supported (this "
            f"flashoptim_dist reads versions 1-{max_version}); upgrade flashoptim_dist"
        )
    if meta.get("family") != opt.family:
        raise ValueError(
            f"state dict was written by a {meta.get('family')!r}-family Flash optimizer, "
            f"this is {type(opt).__name__} ({opt.family!r})"
        )
    saved = FlashConfig(**meta["config"])
    for field in ("group_size", "quantize", "master_weight_bits"):
        if getattr(saved, field) != getattr(opt.config, field):
            raise ValueError(
                f"state dict has {field}={getattr(saved, field)!r} but this optimizer has "
                f"{field}={getattr(opt.config, field)!r}; convert explicitly with "
                "flashoptim_dist.optim.convert_state_dict(...) or construct the optimizer "
                "with the saved numeric config"
            )


def check_loaded_state(p, state: dict, layout: lay.StateLayout, family: str, n_states: int) -> None:
    """Check ``state`` against the dtypes and sizes :func:`allocate_state` would give ``layout``
    and flatten its tensors in place (raises naming the first mismatch)."""
    n = layout.numel
    expect = {}
    if layout.rho_dtype is not None:
        expect["rho"] = (layout.rho_dtype, n)
    for name, kind in FAMILIES[family][:n_states]:
        if layout.quantized:
            expect[name] = (torch.int8 if kind == "signed" else torch.uint8, n)
            expect[name + "_scales"] = (torch.bfloat16, layout.n_scales)
        else:
            expect[name] = (torch.float32, n)
    for k, (dt, size) in expect.items():
        v = state.get(k)
        if v is None:
            raise ValueError(f"loaded optimizer state for a parameter of shape {tuple(p.shape)} lacks {k!r}")
        if v.dtype != dt or v.numel() != size:
            raise ValueError(
                f"loaded optimizer state {k!r} for a parameter of shape {tuple(p.shape)} is "
                f"{v.dtype}[{v.numel()}], expected {dt}[{size}]: the state dict belongs to a "
                "different model, sharding or numeric config"
            )
        state[k] = v.reshape(-1).contiguous()
    for name, kind in FAMILIES[family][:n_states] if layout.quantized else ():
        # scales as the encoder writes them: bf16 bit patterns of finite non-negative values, at
        # most 2^64 for √v scales (√ of the largest fp32; the kernel's √v decoder relies on it)
        bits = state[name + "_scales"].view(torch.int16).to(torch.int32) & 0xFFFF
        top = _SQRT_SCALE_MAX_BITS if kind == "sqrt" else nx._BF16_MAX_BITS >> 16
        if bits.numel() and int(bits.max()) > top:
            raise ValueError(
                f"loaded optimizer state {name + '_scales'!r} for a parameter of shape {tuple(p.shape)} holds "
                f"a value no encoder writes (negative, non-finite{' or above 2^64' if kind == 'sqrt' else ''}): "
                "the checkpoint or state dict is corrupted; load an intact copy"
            )


#: Largest bf16 bit pattern of a √v scale: 2^64 (signed scales reach bf16's largest finite value).
_SQRT_SCALE_MAX_BITS = 0x5F80


def from_torch_state(p, local: torch.Tensor, st: dict, layout: lay.StateLayout, family: str, n_states: int,
                     group_size: int) -> Dict[str, Any]:
    """Quantize a plain torch.optim state entry of ``p`` into the layout ``layout``."""
    step = st.get("step", 0)
    step = int(step.item()) if torch.is_tensor(step) else int(step)
    if family == "sgd" and st.get("momentum_buffer") is not None:
        # torch's SGD keeps no step: its state exists only after a first step, which made
        # the buffer. Step 0 here would make the next step the "first" (buf = grad) and
        # drop the loaded momentum.
        step = max(step, 1)
    out: Dict[str, Any] = {"step": step}
    if layout.rho_dtype is not None:
        out["rho"] = torch.zeros(local.numel(), dtype=layout.rho_dtype, device=local.device)
    for name, kind in FAMILIES[family][:n_states]:
        v = st.get(name)
        if v is None:
            raise ValueError(
                f"plain torch state for a parameter of shape {tuple(p.shape)} has no {name!r}; "
                f"it has {sorted(st)} — was it written by a different optimizer?"
            )
        mine = state_io.local_elementwise(p, v)  # global shape (DTensor or full): our rows
        v = mine if mine is not None else v
        if v.numel() != local.numel():
            raise ValueError(
                f"torch state {name!r} has {v.numel()} elements, the local parameter {local.numel()}"
            )
        v = v.detach().reshape(-1).float().to(local.device)
        if not layout.quantized:
            out[name] = v.clone()
            continue
        codes = torch.empty(local.numel(), dtype=torch.int8 if kind == "signed" else torch.uint8, device=local.device)
        scales = torch.empty(layout.n_scales, dtype=torch.bfloat16, device=local.device)
        fn = nx.quantize_signed if kind == "signed" else nx.quantize_sqrt
        for run in lay.segment_runs(layout):
            q, s = fn(v[run.local], group_size, run.phase)
            codes[run.local] = q
            scales[run.scales] = s
        out[name] = codes
        out[name + "_scales"] = scales
    return out


def dequantize_moment(st: dict, name: str, kind: str, layout: lay.StateLayout, local: torch.Tensor) -> torch.Tensor:
    """The fp32 moment ``name`` of state ``st``, shaped like ``local`` (a copy)."""
    if not layout.quantized:
        return st[name].view(local.shape).clone()
    full = torch.empty(local.numel(), dtype=torch.float32, device=local.device)
    fn = nx.dequantize_signed if kind == "signed" else nx.dequantize_sqrt
    g = layout.group_size
    for run in lay.segment_runs(layout):
        full[run.local] = fn(st[name][run.local], st[name + "_scales"][run.scales], g, run.phase)
    return full.view(local.shape)


def torch_state_dict(opt, base: Dict[str, Any]) -> Dict[str, Any]:
    """:meth:`FlashOptimizer.torch_state_dict` from ``base`` (torch's own ``state_dict()`` of the
    optimizer, for its param groups): per parameter with state, ``step`` as a float tensor and the
    dequantized fp32 moments shaped like the parameter (DTensors for DTensor parameters)."""
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, (p, group) in enumerate(params):
        if p not in opt.state or "step" not in opt.state[p]:
            continue
        dq = opt.dequantized_state(p, group)
        entry = {"step": torch.tensor(float(dq["step"]))}
        for name, _ in FAMILIES[opt.family][: opt._n_states(group)]:
            entry[name] = state_io.as_global(p, dq[name])
        state[i] = entry
    return {"state": state, "param_groups": base["param_groups"]}
