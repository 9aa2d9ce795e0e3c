"""Memory accounting: bytes per parameter of params, grads and optimizer state on each rank.

Bytes are counted from the actual tensors (local shards; every tensor in ``optimizer.state``,
including Flash ρ, 8-bit codes and scales; tensors sharing storage are counted once) and divided
by the number of parameter elements the rank holds, so the numbers compare directly with the
per-parameter costs of the design (FlashAdamW ≈ 2 + 2 + 3.1 = 7.1 B, 5.1 B with gradient
release) and with the torch AdamW baseline on fp32 params:
4 (param) + 4 (grad) + 8 (exp_avg + exp_avg_sq) = 16 bytes/param.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

__all__ = ["tensor_bytes", "breakdown", "peak_memory_bytes", "BASELINE_BYTES", "format_table", "peak_report",
           "record_allocations"]

#: Bytes/param of torch optimizers on fp32 params: (param, grad, state).
BASELINE_BYTES = {
    "AdamW": (4, 4, 8),
    "Adam": (4, 4, 8),
    "SGD": (4, 4, 4),
    "SGDW": (4, 4, 4),
    "Lion": (4, 4, 4),
}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``nbytes`` over distinct tensors (same data pointer and size counted once)."""
    seen = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.nbytes) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.nbytes
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # noqa: BLE001 - platform without resource
        return 0


def record_allocations(on: bool) -> None:
    """Start (``on``) or stop recording the CUDA caching allocator's events for
    :func:`peak_report`. Sizes only unless ``FLASHOPTIM_PEAK_STACKS=1`` (Python stacks: on torch
    2.11 recording them broke a checkpointed block's recompute in backward)."""
    if not on:
        torch.cuda.memory._record_memory_history(enabled=None)
        return
    stacks = os.environ.get("FLASHOPTIM_PEAK_STACKS", "0") == "1"
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python",
                                             context="alloc" if stacks else None)


def peak_report(snapshot: dict, device_index: int = 0, top: int = 14, title: str = "") -> str:
    """What was alive when the memory allocated *since recording started* peaked.

    Replays the allocator trace of ``torch.cuda.memory._snapshot()`` (allocations made before
    the recording are not in it, so the peak is relative to the memory allocated then): the
    ``top`` largest allocations alive at that moment with the innermost frames of this
    package, torch.distributed or autograd that made them (when stacks were recorded). A
    diagnostic for where a peak comes from (docs/engines.md)."""
    trace = snapshot["device_traces"][device_index]
    live, total, peak, at_peak, when = {}, 0, 0, {}, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak, when = total, dict(live), i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]

    def where(ev):
        keep = [f for f in ev.get("frames", []) if "flashoptim" in f["filename"] or "bench/" in f["filename"]
                or "distributed" in f["filename"] or "autograd" in f["filename"]]
        return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in keep[:3])

    lines = [f"# peak report{' ' + title if title else ''}: +{peak / 2**30:.3f} GiB above the start of the recording, "
             f"at event {when} of {len(trace)}; largest live allocations:"]
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:top]:
        lines.append(f"#   {ev['size'] / 2**20:9.1f} MiB  {where(ev)}".rstrip())
    lines.append(f"#   ... {len(at_peak)} live, {sum(e['size'] for e in at_peak.values()) / 2**30:.3f} GiB in all")
    return "\n".join(lines)


def breakdown(engine) -> dict:
    """This rank's memory: bytes of params/grads/optimizer state and the local element count."""
    params = engine.param_tensors()
    n_local = sum(t.numel() for t in {(t.data_ptr(), t.numel()): t for t in params if t.numel()}.values())
    return {
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(engine.grad_tensors()),
        "optim_bytes": tensor_bytes(engine.optimizer_state_tensors()),
        "local_params": int(n_local),
    }


def format_table(rows: list[dict], optimizer: str, baseline: str, engine: str = "", tp_size: int = 1) -> str:
    """Markdown table of per-rank bytes/param with totals and the baseline comparison.

    Each rank's bytes are divided by the parameter elements *it* holds (its local shards), so the
    per-rank bytes/param compare with the design's per-parameter costs under any sharding; with
    tensor parallelism the ranks hold 1/(dp·tp) of each split weight and 1/dp of the norms
    (replicated over tp), and the "params held" column adds up to more than the model's size."""
    base = BASELINE_BYTES.get(baseline, (4, 4, 8))
    lines = [
        "| rank | params held | param B/p | grad B/p | optim B/p | total B/p "
        "| param MiB | grad MiB | optim MiB | peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = max(r["local_params"], 1)
        pb, gb, ob = r["param_bytes"] / n, r["grad_bytes"] / n, r["optim_bytes"] / n
        lines.append(
            f"| {r['rank']} | {r['local_params']:,} | {pb:.2f} | {gb:.2f} | {ob:.2f} | {pb + gb + ob:.2f} | "
            f"{r['param_bytes'] / 2**20:.2f} | {r['grad_bytes'] / 2**20:.2f} | {r['optim_bytes'] / 2**20:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} |"
        )
    tot_n = sum(max(r["local_params"], 0) for r in rows) or 1
    tot = sum(r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in rows) / tot_n
    lines.append("")
    lines.append(
        f"{optimizer}: {tot:.2f} bytes/param (params + grads + optimizer state, averaged over ranks) vs the torch "
        f"{baseline} baseline on fp32 params: {sum(base)} bytes/param ({base[0]} param + {base[1]} grad + "
        f"{base[2]} state) -> {sum(base) / tot if tot else float('nan'):.2f}x smaller."
    )
    lines.append(
        "Bytes are counted from the actual local tensors and divided by the parameter elements each rank holds; "
        "grads are measured after the last backward (0 with gradient release: each grad is freed in its hook)."
    )
    if tp_size > 1:
        lines.append(
            f"Tensor parallel (engine.tp_size={tp_size}): each rank holds 1/(dp x tp) of every split weight "
            "and 1/dp of the norms, which the tp ranks of a dp group each keep (with their optimizer state): "
            "'params held' counts what a rank stores, so the ranks' counts add up to more than the model's parameters."
        )
    if engine.startswith("zero"):
        lines.append(
            "DeepSpeed ZeRO: gradients live in DeepSpeed's own reduction buffers between steps and are not counted; "
            "params are the module's bf16 copy (stage 3: the local partition), optimizer state is the client "
            "optimizer's state plus any flat partition DeepSpeed keeps apart from the module (e.g. fp32 masters)."
        )
    return "\n".join(lines)


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
