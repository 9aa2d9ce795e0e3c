"""FSDP2 memory/speed benchmark: torch AdamW vs FlashAdamW vs FlashAdamW + gradient release.

GPU (the numbers that go in docs/PERFORMANCE.md, 2 cards)::

    torchrun --nproc_per_node 2 bench/dist.py [--cases torch_adamw,flash,flash_release] [--json out.json]

CPU smoke test (gloo, a tiny model; what tests/bench/test_fsdp2_bench.py runs)::

    torchrun --nproc_per_node 2 bench/dist.py --tiny

FSDP2 + tensor parallelism (``--tp N``: a (ranks/N, N) mesh, ``GPT.tensor_parallel_plan`` applied
on "tp" before ``fully_shard`` on "dp", torchtitan's order; the N ranks of a dp group share a
batch)::

    torchrun --nproc_per_node 2 bench/dist.py --tp 2 --cases flash,flash_release

Model: GPT-like, d_model 2048, 24 layers, 16 heads, GELU MLP 4x, vocab 32000, untied head
(1.339e9 params); batch 2 x 1024 tokens per rank; 8 iterations, median of the last 5.

Cases (each one a fresh model and optimizer, run one after the other in this process):

``torch_adamw``
    fp32 params sharded by FSDP2, bf16 compute (MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)), ``torch.optim.AdamW(fused=True)``.
``flash``
    model cast to bf16 before ``fully_shard`` (fp32 reduce), ``FlashAdamW``.
``flash_release``
    as ``flash`` with :func:`flashoptim_dist.enable_gradient_release`: each sharded param is
    updated in its post-accumulate-grad hook right after its reduce-scatter and its grad freed.

Printed per rank: persistent GiB (allocated at the start of an iteration: params + optimizer
state, grads already freed), peak GiB (max allocated over the measured iterations), and for the
case: persistent bytes/param × world (sum over ranks / params), iteration ms and optimizer-step
ms (synchronized before and after ``step()``; "host ms" is the part until ``step()`` returns;
under release the update runs inside backward and
the step column says so). On CPU the allocator numbers are not available: persistent bytes are
counted from the tensors (params + optimizer state) and peak is not reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import flashoptim_dist as fo  # noqa: E402
import flashoptim_dist.distributed  # noqa: E402,F401  (FSDP2 adapter, release checks)
from flashoptim_dist.models.gpt import GPT, GPTConfig  # noqa: E402
from flashoptim_dist.train.memory import peak_report, record_allocations  # noqa: E402

CASES = ("torch_adamw", "flash", "flash_release")
GiB = 1024**3


def model_config(tiny: bool) -> GPTConfig:
    if tiny:
        return GPTConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp="gelu", max_seq_len=32)
    return GPTConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, mlp="gelu", max_seq_len=1024)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU/gloo (smoke test)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--measure", type=int, default=5, help="median over the last N iterations")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; 32 with --tiny)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reduce-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--profile-step", action="store_true",
                    help="rank 0: print a cProfile of the last iteration's optimizer step (host side)")
    ap.add_argument("--wrap-embeddings", action="store_true",
                    help="shard the token embedding and the output head as FSDP units of their own")
    ap.add_argument("--ac", action="store_true",
                    help="activation checkpointing per block: activations stop setting the peak, so "
                         "what gradient release saves (the sharded grads) shows in it")
    ap.add_argument("--loss-chunks", type=int, default=0,
                    help="compute head + cross-entropy in this many token slices, recomputed in backward "
                         "(0: full logits, as a plain training loop does)")
    ap.add_argument("--peak-report", action="store_true",
                    help="rank 0: trace the allocator in the last iteration and print what is alive at its peak")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel degree (GPT.tensor_parallel_plan on a (ranks/tp, tp) mesh, FSDP2 on dp)")
    ap.add_argument("--json", default=None, help="write the results (rank 0) to this file")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {CASES}")
    if args.seq is None:
        args.seq = 32 if args.tiny else 1024
    if not 1 <= args.measure <= args.iters:
        ap.error("--measure must be between 1 and --iters")
    return args


def setup(tiny: bool, tp: int = 1):
    use_cuda = torch.cuda.is_available() and not tiny
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python bench/dist.py`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if tp == 1:
        return device, init_device_mesh(device.type, (world,))
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the {world} ranks")
    world_mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return device, world_mesh


def profile_step(opt) -> None:
    """One optimizer step under cProfile (host side): top functions by own time."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    opt.step()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(case: str, cfg: GPTConfig, mesh, device, args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = GPT(cfg)
    if args.tp > 1:  # tensor parallelism on "tp", then FSDP2 on "dp" (torchtitan's order)
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, mesh["tp"], model.tensor_parallel_plan())
        mesh = mesh["dp"]
    reduce = torch.float32 if args.reduce_dtype == "fp32" else torch.bfloat16
    if case == "torch_adamw":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    else:
        model = model.to(torch.bfloat16)  # cast before sharding: params and grads are bf16
        mp = MixedPrecisionPolicy(reduce_dtype=reduce)
    units = list(model.blocks)
    if args.wrap_embeddings:  # torchtitan-style: embedding and output head in units of their own
        units = [model.tok_emb] + units + [model.head]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    params = list(model.parameters())
    if case == "torch_adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    else:
        opt = fo.FlashAdamW(params, lr=args.lr, weight_decay=0.01)
    handle = fo.enable_gradient_release(model, opt) if case == "flash_release" else None
    return model, opt, handle


def tensor_bytes(model, opt) -> int:
    """Bytes of local params and optimizer state on this rank (the 'persistent' tensors)."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "_local_tensor", p)
        total += t.numel() * t.element_size()
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                t = getattr(v, "_local_tensor", v)
                total += t.numel() * t.element_size()
    return total


def run_case(case: str, cfg: GPTConfig, mesh, device, args) -> dict:
    rank = dist.get_rank()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, handle = build(case, cfg, mesh, device, args)
    gen = torch.Generator(device="cpu").manual_seed(1 + rank // args.tp)  # a dp group's tp ranks share a batch
    tokens = [
        torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        for _ in range(args.iters)
    ]
    iter_ms, step_ms, host_ms, persistent = [], [], [], []
    first_measured = args.iters - args.measure
    for it in range(args.iters):
        if it == first_measured and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        report_peak = args.peak_report and cuda and it == args.iters - 1 and dist.get_rank() == 0
        if report_peak:
            record_allocations(True)
        if it >= first_measured:
            persistent.append(torch.cuda.memory_allocated(device) if cuda else tensor_bytes(model, opt))
        t0 = time.perf_counter()
        x = tokens[it]
        if args.loss_chunks:  # head + loss in slices, recomputed in backward (models/gpt.py)
            logits = None
            loss = model(x[:, :-1], targets=x[:, 1:], loss_chunks=args.loss_chunks)
        else:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        loss.backward()
        if handle is None:
            sync(device)
            s0 = time.perf_counter()
            if it == args.iters - 1 and args.profile_step and dist.get_rank() == 0:
                profile_step(opt)
            else:
                opt.step()
            host_ms.append((time.perf_counter() - s0) * 1e3)  # until step() returns: host work
            sync(device)
            step_ms.append((time.perf_counter() - s0) * 1e3)
            opt.zero_grad(set_to_none=True)
        sync(device)
        iter_ms.append((time.perf_counter() - t0) * 1e3)
        if report_peak:
            snapshot = torch.cuda.memory._snapshot()
            record_allocations(False)
            print(peak_report(snapshot, device.index or 0, title=f"case {case}"), flush=True)
        del logits, loss
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    n_params = sum(p.numel() for p in model.parameters())  # global numel of the DTensors
    res = {
        "case": case,
        "rank": rank,
        "persistent_bytes": max(persistent),
        "peak_bytes": peak,
        "tensor_bytes": tensor_bytes(model, opt),
        "iter_ms": statistics.median(iter_ms[first_measured:]),
        "step_ms": statistics.median(step_ms[first_measured:]) if step_ms else None,
        "step_host_ms": statistics.median(host_ms[first_measured:]) if host_ms else None,
        "n_params": n_params,
        "final_loss": None,
    }
    if handle is not None:
        handle.remove()
    del model, opt, handle, tokens
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def report(all_ranks: list, world: int, device, cfg_desc: str, title: str = "bench/dist.py") -> list:
    lines = [f"# {title}: {cfg_desc}, world {world}, device {device}"]
    hdr = f"{'case':<14} {'rank':>4} {'persist GiB':>11} {'peak GiB':>9} {'iter ms':>9} {'step ms':>9} {'host ms':>8}"
    lines.append(hdr)
    summary = []
    for case in dict.fromkeys(r["case"] for r in all_ranks):
        rows = [r for r in all_ranks if r["case"] == case]
        for r in rows:
            peak = f"{r['peak_bytes'] / GiB:9.3f}" if r["peak_bytes"] is not None else f"{'n/a':>9}"
            step = f"{r['step_ms']:9.2f}" if r["step_ms"] is not None else f"{'in bwd':>9}"
            host = f"{r['step_host_ms']:8.2f}" if r.get("step_host_ms") is not None else f"{'':>8}"
            lines.append(f"{case:<14} {r['rank']:>4} {r['persistent_bytes'] / GiB:11.3f} {peak} "
                         f"{r['iter_ms']:9.2f} {step} {host}")
        n = rows[0]["n_params"]
        bpp = sum(r["persistent_bytes"] for r in rows) / n
        tb = sum(r["tensor_bytes"] for r in rows) / n
        it = max(r["iter_ms"] for r in rows)
        st = max(r["step_ms"] for r in rows) if rows[0]["step_ms"] is not None else None
        peak = max(r["peak_bytes"] for r in rows) if rows[0]["peak_bytes"] is not None else None
        summary.append(
            dict(case=case, params=n, bytes_per_param_x_world=bpp, tensor_bytes_per_param=tb, iter_ms=it, step_ms=st,
                 peak_gib_max=None if peak is None else peak / GiB, ranks=rows)
        )
    lines.append("")
    lines.append(
        f"{'case':<14} {'params':>12} {'bytes/param x world':>20} {'(params+state)':>15} {'iter ms':>9} {'step ms':>9}"
    )
    for s in summary:
        step = f"{s['step_ms']:9.2f}" if s["step_ms"] is not None else f"{'in bwd':>9}"
        lines.append(
            f"{s['case']:<14} {s['params']:>12.4g} {s['bytes_per_param_x_world']:>20.3f} "
            f"{s['tensor_bytes_per_param']:>15.3f} {s['iter_ms']:>9.2f} {step}"
        )
    print("\n".join(lines), flush=True)
    return summary


def model_desc(cfg: GPTConfig, args) -> str:
    return (f"GPT d_model={cfg.d_model} layers={cfg.n_layers} vocab={cfg.vocab_size} "
            f"({cfg.num_params():.4g} params), batch {args.batch}x{args.seq} tokens/rank, "
            f"{args.iters} iters, median of last {args.measure}")


def gather_and_report(results: list, device, desc: str, title: str, json_path, extra: dict = None) -> None:
    """Collect every rank's case records on rank 0, print the tables, write ``json_path``."""
    world = dist.get_world_size()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        flat = [r for rank_res in gathered for r in rank_res]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        summary = report(flat, world, name, desc, title=title)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"device": name, "world": world, "config": desc, **(extra or {}), "results": summary},
                          f, indent=2)
    dist.barrier()


def main(argv=None) -> int:
    args = parse_args(argv)
    device, mesh = setup(args.tiny, args.tp)
    cfg = model_config(args.tiny)
    if args.ac:
        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
    if args.tiny:
        torch.set_num_threads(1)
    results = []
    for case in args.cases:
        results.append(run_case(case, cfg, mesh, device, args))
        dist.barrier()
    desc = (model_desc(cfg, args)
            + (", activation checkpointing per block" if args.ac else "")
            + (", embedding and head in their own FSDP units" if args.wrap_embeddings else "")
            + (f", head + loss in {args.loss_chunks} recomputed slices" if args.loss_chunks else "")
            + (f", tensor parallel {args.tp} (dp {dist.get_world_size() // args.tp} x tp {args.tp})"
               if args.tp > 1 else ""))
    gather_and_report(results, device, desc, "bench/dist.py", args.json)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def exit_without_teardown(code: int) -> None:
    """Leave without interpreter shutdown: after a distributed run, tearing down torch's and
    gloo's globals at exit occasionally aborts a finished job ("terminate called without an
    active exception", seen on CPU; flashoptim_dist.cli does the same after train)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
