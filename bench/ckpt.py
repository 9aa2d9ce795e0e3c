"""Checkpoint benchmark: FSDP2 + FlashAdamW through flashoptim_dist.checkpoint vs FSDP2 + torch
AdamW through plain DCP (``get_state_dict`` + ``dcp.save``), and a load that reshards 2 → 1.

GPU (the numbers that go in docs/PERFORMANCE.md; 2 cards, name the card)::

    python bench/ckpt.py --json ckpt.json               # spawns torchrun 2 ranks, then 1 rank

CPU smoke test (gloo, tiny model)::

    python bench/ckpt.py --tiny

Model: the GPT of bench/dist.py (d_model 2048, 24 layers, GELU MLP 4x, vocab 32000, untied head,
1.339e9 params). Each case builds the model, takes one optimizer step on random tokens (so every
state exists), then:

``flash``   save with ``flashoptim_dist.checkpoint.save`` (each rank writes its shards; fsync;
            CRC-32 manifest), load into a fresh model+optimizer on the same 2 ranks with
            ``verify="checksum"`` and again with ``verify="size"``; then, in a separate 1-rank
            job, load the 2-rank checkpoint (reshard 2 → 1).
``torch``   fp32 params + ``torch.optim.AdamW(fused=True)``; ``get_state_dict`` + ``dcp.save``,
            ``dcp.load`` + ``set_state_dict`` on 2 ranks, and the 1-rank reshard load.

Times are wall-clock seconds on rank 0 between barriers (device synchronized). Bytes are the
checkpoint directory's size. The page cache is not dropped between save and load (no root on the
device machines); loads therefore measure DCP's read path + our checks, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU/gloo (smoke test)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the save (default 2)")
    ap.add_argument("--cases", default="flash,torch")
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------ worker side


def _setup(tiny):
    import torch

    from bench.dist import setup

    device, mesh = setup(tiny)
    if device.type == "cpu":
        torch.set_num_threads(1)
    return device, mesh


def _build(case, tiny, mesh, device):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import flashoptim_dist as fo
    import flashoptim_dist.distributed  # noqa: F401
    from bench.dist import model_config
    from flashoptim_dist.models.gpt import GPT

    cfg = model_config(tiny)
    with torch.device("meta"):
        model = GPT(cfg)
    if case == "torch":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        model = model.to(torch.bfloat16)
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    if case == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    else:
        opt = fo.FlashAdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt, cfg


def _one_step(model, opt, cfg, device, tiny):
    import torch
    import torch.nn.functional as F

    seq = 32 if tiny else 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, seq + 1), generator=g).to(device)
    logits = model(x[:, :-1])
    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timed(fn, device):
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return time.perf_counter() - t0, out


def _worker(args):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import flashoptim_dist.checkpoint as fckpt
    from flashoptim_dist.train.ckpt import dir_bytes

    device, mesh = _setup(args.tiny)
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for case in args.cases.split(","):
        path = os.path.join(args.dir, case)
        r = res[case] = {}
        model, opt, cfg = _build(case, args.tiny, mesh, device)
        r["params"] = sum(p.numel() for p in model.parameters())
        if args.phase == "save":
            _one_step(model, opt, cfg, device, args.tiny)
            if case == "flash":
                r["save_s"], _ = _timed(lambda: fckpt.save(path, model, opt, step=1), device)
            else:
                def plain_save():
                    msd, osd = get_state_dict(model, opt)
                    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

                r["save_s"], _ = _timed(plain_save, device)
            r["bytes"] = dir_bytes(path) if rank == 0 else None
            model = opt = None  # free before building the fresh model the load goes into
            model, opt, cfg = _build(case, args.tiny, mesh, device)
        # load (same world on the "save" phase, 1 rank on the "reshard" phase)
        if case == "flash":
            r["load_s"], _ = _timed(lambda: fckpt.load(path, model, opt), device)
            r["load_size_check_s"], _ = _timed(lambda: fckpt.load(path, model, opt, verify="size"), device)
        else:
            def plain_load():
                msd, osd = get_state_dict(model, opt)  # materializes fp32 optimizer state to load into
                sd = {"model": msd, "optim": osd}
                dcp.load(sd, checkpoint_id=path)
                set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

            _one_step(model, opt, cfg, device, args.tiny)  # torch AdamW creates its state lazily
            r["load_s"], _ = _timed(plain_load, device)
        model = opt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ driver


def _torchrun(nproc, args, phase, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--phase", phase, "--out", out, "--dir", args.dir, "--cases", args.cases]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run(cmd, check=True, env=env, cwd=_ROOT)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.phase:
        _worker(args)
        return 0
    own_dir = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="flashoptim_ckpt_bench_")
    try:
        saved = _torchrun(args.nproc, args, "save", os.path.join(args.dir, "save.json"))
        resh = _torchrun(1, args, "reshard", os.path.join(args.dir, "reshard.json"))
    finally:
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
    rows = []
    for case in args.cases.split(","):
        s, r = saved[case], resh[case]
        rows.append({
            "case": case, "params": s["params"], "bytes": s["bytes"], "bytes_per_param": s["bytes"] / s["params"],
            "save_s": s["save_s"], f"load_{args.nproc}rank_s": s["load_s"],
            "load_size_check_s": s.get("load_size_check_s"), "reshard_load_1rank_s": r["load_s"],
        })
    print(f"device: {saved['device']}; save on {saved['world']} ranks, reshard load on 1")
    hdr = (f"{'case':6s} {'params':>14s} {'GB':>8s} {'B/param':>8s} {'save s':>8s} {'load s':>8s} "
           f"{'load(size) s':>12s} {f'{args.nproc}->1 s':>8s}")
    print(hdr)
    for row in rows:
        ls = row["load_size_check_s"]
        print(f"{row['case']:6s} {row['params']:>14,d} {row['bytes'] / 1e9:>8.2f} {row['bytes_per_param']:>8.3f} "
              f"{row['save_s']:>8.2f} {row[f'load_{args.nproc}rank_s']:>8.2f} "
              f"{(f'{ls:.2f}' if ls is not None else '-'):>12s} "
              f"{row['reshard_load_1rank_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": saved["device"], "world": saved["world"], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    from bench.dist import exit_without_teardown  # its worker phases run torch.distributed

    exit_without_teardown(main())
