"""DeepSpeed ZeRO-2/3 memory/speed benchmark: DeepSpeed's bf16 modes with torch AdamW vs FlashAdamW.

GPU (the numbers that go in docs/PERFORMANCE.md, 2 cards)::

    torchrun --nproc_per_node 2 bench/deepspeed_bench.py [--stages 2,3] [--cases ds_default,ds_bf16,flash] \
        [--json out.json]
    deepspeed --num_gpus 2 bench/deepspeed_bench.py ...          # the DeepSpeed launcher works too

CPU smoke test (gloo, DS_ACCELERATOR=cpu, a tiny model; what tests/bench/test_bench_deepspeed.py runs)::

    torchrun --nproc_per_node 2 bench/deepspeed_bench.py --tiny

Model and protocol: those of bench/dist.py (imported from it): GPT-like, d_model 2048, 24 layers,
16 heads, GELU MLP 4x, vocab 32000, untied head (1.339e9 params); batch 2 x 1024 tokens per rank;
8 iterations, median of the last 5. The model is built in bf16 on the device from one seed and
handed to the engine (DeepSpeed casts to bf16 under ``"bf16": {"enabled": true}`` anyway, and its
fp32 master is an upcast of the bf16 partition either way).

Cases, for each ZeRO stage in ``--stages`` (named ``z<stage>_<case>``; each a fresh model and engine,
one after the other in this process, everything freed in between):

``ds_default``
    ``deepspeed.initialize`` with ``"bf16": {"enabled": true}`` (fp32 master partitions) and
    ``"optimizer": {"type": "AdamW", "params": {..., "torch_adam": true}}`` (torch.optim.AdamW,
    ``fused=True`` on GPU; without ``torch_adam`` DeepSpeed would JIT-build its FusedAdam op).
``ds_bf16``
    as ``ds_default`` plus ``bf16_master_weights_and_grads`` and ``bf16_optimizer_states``
    (bf16 master partitions and bf16 AdamW states).
``flash``
    ``flashoptim_dist.deepspeed.initialize`` with ``"optimizer": {"type": "FlashAdamW", ...}``: bf16
    partitions are the master (DeepSpeed's duplicate copy dropped), ρ and 8-bit states.

ZeRO settings are DeepSpeed's defaults for the stage (override with ``--zero KEY=VALUE``; with
``--tiny``, ZeRO-3 also gets ``stage3_param_persistence_threshold=0`` so the tiny model's params are
partitioned at all). Same lr (1e-4), weight decay (0.01) and betas (0.9, 0.999) in every case; no
gradient clipping, no accumulation.

Printed per rank: persistent GiB (``torch.cuda.memory_allocated`` at the start of an iteration:
params, master partitions, optimizer state and whatever else DeepSpeed keeps between steps),
peak GiB (max allocated over the measured iterations), iteration ms and optimizer-step ms
(``engine.step()``, synchronized before and after: unscale/clip, the optimizer step, the copy back
and, under ZeRO-1/2, the parameter all-gather); then the summary table of bench/dist.py. On CPU
(``--tiny``) the allocator numbers are not available: persistent bytes are counted from the
tensors (model params or their ZeRO-3 partitions, the flat master partitions and the optimizer
state; shared storage counted once) and peak is not reported. After each case the engine is
destroyed and the memory still allocated is checked (a warning names what is left).

What DeepSpeed keeps besides params and optimizer state (in the GPU numbers, not in the tensor
count): under ZeRO-3 a gradient partition buffer (partition size, bf16) and a reduce bucket of
``reduce_bucket_size`` elements (default 5e8, bf16: 0.93 GiB) allocated at start-up; under ZeRO-1/2
the buckets are freed after each backward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.dist import GiB, gather_and_report, model_config, model_desc, sync  # noqa: E402  (same model, same table)
from flashoptim_dist.models.gpt import GPT  # noqa: E402

CASES = ("ds_default", "ds_bf16", "flash")
STAGES = (2, 3)
MiB = 1024**2
#: memory still allocated after a case's engine is freed above which a warning is printed
LEFTOVER_WARN_BYTES = 64 * MiB


def _parse_zero_override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--zero expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (DS_ACCELERATOR=cpu, gloo): smoke test")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    ap.add_argument("--stages", default=",".join(map(str, STAGES)), help="comma-separated ZeRO stages (1, 2, 3)")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--measure", type=int, default=5, help="median over the last N iterations")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; 32 with --tiny)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--zero", action="append", type=_parse_zero_override, default=[], metavar="KEY=VALUE",
                    help="override a zero_optimization key in every case (JSON value), e.g. --zero overlap_comm=true")
    ap.add_argument("--json", default=None, help="write the results (rank 0) to this file")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DS launcher
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {CASES}")
    try:
        args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--stages must be comma-separated integers, got {args.stages!r}")
    for s in args.stages:
        if s not in (1, 2, 3):
            ap.error(f"unknown ZeRO stage {s}; choose from 1, 2, 3")
    if not args.cases or not args.stages:
        ap.error("--cases and --stages must each name at least one entry")
    if args.seq is None:
        args.seq = 32 if args.tiny else 1024
    if not 1 <= args.measure <= args.iters:
        ap.error("--measure must be between 1 and --iters")
    args.zero = dict(args.zero)
    if "stage" in args.zero:
        ap.error("set the stage with --stages, not --zero stage=...")
    return args


# ------------------------------------------------------------------------------------ setup


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise SystemExit(
            f"bench/deepspeed_bench.py needs DeepSpeed ({e}): DS_BUILD_OPS=0 pip install deepspeed==0.19.8 "
            "(where nothing can be fetched, carry that wheel and its pure-Python deps and pip install them "
            "with --no-index --target DIR, then put DIR on PYTHONPATH)"
        ) from None
    return deepspeed


def setup(tiny: bool):
    """Process group through ``deepspeed.init_distributed`` (works under torchrun and the DeepSpeed
    launcher); returns the device."""
    if tiny:
        acc = os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if acc != "cpu":
            raise SystemExit(f"--tiny runs on CPU: DS_ACCELERATOR must be 'cpu' (or unset), got {acc!r}")
        # the CPU accelerator's device_count() comes from LOCAL_SIZE (the DeepSpeed launcher sets it; torchrun does not)
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run the full benchmark on GPUs, or pass --tiny for the CPU smoke test")
    if "RANK" not in os.environ:  # plain `python bench/deepspeed_bench.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tiny:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    deepspeed = _import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo" if tiny else "nccl")
    return device


def ds_config(case: str, stage: int, args, cuda: bool) -> dict:
    zero = {"stage": stage}
    if args.tiny and stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    zero.update(args.zero)
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case == "flash":
        cfg["optimizer"] = {"type": "FlashAdamW", "params": {"lr": args.lr, "weight_decay": 0.01}}
    else:
        params = {"lr": args.lr, "weight_decay": 0.01, "torch_adam": True}
        if cuda:
            params["fused"] = True  # as bench/dist.py's torch_adamw case
        cfg["optimizer"] = {"type": "AdamW", "params": params}
        if case == "ds_bf16":
            cfg["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return cfg


def build_engine(case: str, stage: int, cfg, device, args):
    import deepspeed

    import flashoptim_dist.deepspeed as fds

    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(torch.bfloat16)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    config = ds_config(case, stage, args, device.type == "cuda")
    init = fds.initialize if case == "flash" else deepspeed.initialize
    engine, _, _, _ = init(model=model, model_parameters=params, config=config)
    fds.release_cpu_comm_buffer()  # (plain deepspeed.initialize leaves its CPU segment in /dev/shm)
    return engine, n_params, config


# ---------------------------------------------------------------------------------- measuring


def _flat_partitions(engine) -> list:
    from flashoptim_dist.deepspeed import flat_partitions

    return flat_partitions(engine)


def ds_tensor_bytes(engine) -> int:
    """Bytes of this rank's persistent tensors: model params (their ZeRO-3 partitions), the flat
    partitions handed to the optimizer, and optimizer state. Storage shared by several of them (ZeRO-1/2
    params are views of one flat buffer; Flash's master partition is the model partition) counts once."""
    seen = set()
    total = 0

    def add(t):
        nonlocal total
        if not torch.is_tensor(t) or t.numel() == 0:
            return
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        if key in seen:
            return
        seen.add(key)
        total += st.nbytes()

    for p in engine.module.parameters():
        add(p.data)
        add(getattr(p, "ds_tensor", None))
    for flat in _flat_partitions(engine):
        add(flat)
    for state in engine.basic_optimizer.state.values():
        for v in state.values():
            add(v)
    return total


def _engine_facts(engine) -> dict:
    flats = _flat_partitions(engine)
    info = getattr(engine, "_flashoptim_info", None) or {}
    return {
        "zero_optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "master_dtype": ",".join(sorted({str(f.dtype).replace("torch.", "") for f in flats})) or None,
        "dedupe_bytes": int(info.get("dedupe_bytes", 0)),
    }


def release_engine(engine) -> None:
    """``engine.destroy()`` plus what it misses under ZeRO-3 in DeepSpeed 0.19.8, where two module-level
    references keep the root module alive, and through the engine's forward hooks on it the whole
    engine (partitions, optimizer state) would outlive ``del engine``:

    * ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: the root module is pushed when
      the hooks are installed and never popped;
    * ``PartitionedParameterCoordinator.__params_to_release`` is a class-level
      ``functools.lru_cache`` keyed on (coordinator, submodule, step), filled from the second
      forward on.

    Both are feature-detected; with another layout this does only ``engine.destroy()`` and the
    leftover check in :func:`run_case` says what stayed."""
    module = engine.module
    if hasattr(engine, "destroy"):
        engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
    except ImportError:  # pragma: no cover - layout of another DeepSpeed version
        parameter_offload = None
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import (
            PartitionedParameterCoordinator,
        )
    except ImportError:  # pragma: no cover
        return
    for attr in vars(PartitionedParameterCoordinator).values():
        candidates = [attr]
        for cell in getattr(attr, "__closure__", None) or ():  # under the instrument_w_nvtx wrapper
            try:
                candidates.append(cell.cell_contents)
            except ValueError:
                pass
        for fn in candidates:
            if callable(getattr(fn, "cache_clear", None)):
                fn.cache_clear()


def run_case(case: str, stage: int, cfg, device, args) -> dict:
    import deepspeed.comm as dist

    rank = dist.get_rank()
    cuda = device.type == "cuda"
    name = f"z{stage}_{case}"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine, n_params, config = build_engine(case, stage, cfg, device, args)
    facts = _engine_facts(engine)
    gen = torch.Generator(device="cpu").manual_seed(1 + rank)
    tokens = [
        torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        for _ in range(args.iters)
    ]
    iter_ms, step_ms, persistent = [], [], []
    first_measured = args.iters - args.measure
    loss_val = None
    for it in range(args.iters):
        if it == first_measured and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        if it >= first_measured:
            persistent.append(torch.cuda.memory_allocated(device) if cuda else ds_tensor_bytes(engine))
        t0 = time.perf_counter()
        x = tokens[it]
        logits = engine(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        engine.backward(loss)
        sync(device)
        s0 = time.perf_counter()
        engine.step()
        sync(device)
        step_ms.append((time.perf_counter() - s0) * 1e3)
        iter_ms.append((time.perf_counter() - t0) * 1e3)
        loss_val = float(loss.detach().float().item())
        del logits, loss
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    res = {
        "case": name,
        "stage": stage,
        "optimizer_case": case,
        "rank": rank,
        "persistent_bytes": max(persistent),
        "peak_bytes": peak,
        "tensor_bytes": ds_tensor_bytes(engine),
        "iter_ms": statistics.median(iter_ms[first_measured:]),
        "step_ms": statistics.median(step_ms[first_measured:]),
        "n_params": n_params,
        "final_loss": loss_val,
        "zero_optimization": config["zero_optimization"],
        **facts,
    }
    # free everything and check that it is gone
    module_ref = weakref.ref(engine.module)
    opt_ref = weakref.ref(engine.basic_optimizer)
    release_engine(engine)
    del engine, tokens, x
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        res["leftover_bytes"] = torch.cuda.memory_allocated(device)  # nothing should survive a case
    else:
        res["leftover_bytes"] = None
    res["engine_freed"] = module_ref() is None and opt_ref() is None
    peak_s = f"{peak / GiB:.3f}" if peak is not None else "n/a"
    left_s = f"{res['leftover_bytes'] / MiB:.1f} MiB" if cuda else "n/a (CPU)"
    print(
        f"[rank {rank}] {name}: persistent {res['persistent_bytes'] / GiB:.3f} GiB, peak {peak_s} GiB, "
        f"iter {res['iter_ms']:.2f} ms, step {res['step_ms']:.2f} ms, loss {loss_val:.4f}; "
        f"{facts['zero_optimizer']}/{facts['basic_optimizer']}, master {facts['master_dtype']}, "
        f"dedupe {facts['dedupe_bytes'] / MiB:.1f} MiB; left after free: {left_s}, "
        f"engine freed: {res['engine_freed']}",
        flush=True,
    )
    if not res["engine_freed"] or (cuda and res["leftover_bytes"] > LEFTOVER_WARN_BYTES):
        print(
            f"[rank {rank}] WARNING: {name} was not fully freed (engine objects alive: {not res['engine_freed']}, "
            f"{left_s} still allocated); later cases' persistent numbers include it: run cases one per process "
            "(--stages/--cases) to compare them cleanly",
            flush=True,
        )
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup(args.tiny)
    import deepspeed
    import deepspeed.comm as dist

    cfg = model_config(args.tiny)
    if args.tiny:
        torch.set_num_threads(1)
    results = []
    for stage in args.stages:
        for case in args.cases:
            results.append(run_case(case, stage, cfg, device, args))
            dist.barrier()
    desc = model_desc(cfg, args) + f", DeepSpeed {deepspeed.__version__}, torch {torch.__version__}"
    gather_and_report(results, device, desc, "bench/deepspeed_bench.py", args.json,
                      extra={"deepspeed": deepspeed.__version__, "torch": torch.__version__})
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from bench.dist import exit_without_teardown

    exit_without_teardown(main())
