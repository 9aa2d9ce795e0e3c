"""Run a test body on N gloo CPU processes.

``run_distributed(worker, world_size, *args)`` starts ``world_size`` processes (start method
"forkserver", torch preloaded), initialises a gloo process group in each through a file store (no TCP port to pick,
so parallel test sessions cannot collide), calls ``worker(rank, world_size, *args)`` and returns
the list of the workers' return values (rank order). ``worker`` must be a module-level function
(it is pickled by reference).

Failure handling: an exception in any child fails the call with that child's traceback
(``torch.multiprocessing`` re-raises it as ``ProcessRaisedException``, whose message holds the
child's formatted traceback) and the other children are terminated; a run that exceeds
``timeout`` seconds kills every child and raises ``TimeoutError`` — a hung collective can never
hang the test session. Either error carries a note with the Python stack of every rank that was
still running when it was stopped (faulthandler on SIGTERM and a real-time signal), so a hang names where each
rank waited.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import time

import multiprocessing
import multiprocessing.connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Children are forked from a forkserver that has imported torch once: a rank starts in ~0.05 s
# instead of the ~3-8 s a fresh "spawn" interpreter needs to import torch on 2 shared cores.
_START_METHOD = "forkserver"
multiprocessing.set_forkserver_preload(
    ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "flashoptim_dist"]
)

__all__ = [
    "run_distributed", "local_records", "assemble", "compare_to_reference", "bits", "E2E_STEPS", "E2E_LR",
    "tiny_gpt_config", "build_tiny_gpt", "e2e_batches", "lm_loss", "rank_slice", "reference_losses",
]


#: The signal on which every rank writes its Python stacks (see ``_entry``).
_DUMP_SIGNAL = signal.SIGRTMIN + 3


def _entry(rank, worker, world_size, tmpdir, args, pg_timeout_s):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks are local; never pick an outside NIC
    # the CI machine has 2 cores shared by up to 4 ranks: one intra-op thread each
    torch.set_num_threads(1)
    # Python stacks of every thread on _DUMP_SIGNAL (sent at the timeout and when another rank
    # fails) and on the SIGTERM with which torch stops the ranks: a hang then names where each
    # rank was waiting. A real-time signal, because frameworks take SIGUSR1 and SIGTERM for
    # themselves (Lightning's SLURM requeue handler, for one).
    stacks = open(os.path.join(tmpdir, f"stack{rank}.txt"), "w")
    faulthandler.register(_DUMP_SIGNAL, file=stacks, all_threads=True)
    faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(tmpdir, "store"),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    try:
        result = worker(rank, world_size, *args)
        with open(os.path.join(tmpdir, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # wait for every rank to finish before tearing the group down — on a store of its own,
        # not with a collective: a framework that leaves the ranks' collective sequences out of
        # step (seen with the Accelerate, HF Trainer and Lightning examples, ~1 run in 5) would
        # pair a barrier with a stray collective and hang one rank to the timeout
        done = dist.FileStore(os.path.join(tmpdir, "done"), world_size)
        done.set(f"rank{rank}", "1")
        done.wait([f"rank{r}" for r in range(world_size)], datetime.timedelta(seconds=pg_timeout_s))
    finally:
        dist.destroy_process_group()
    # skip interpreter teardown (seconds with torch loaded); results are on disk already
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(worker, world_size: int, *args, timeout: float = 240.0, pg_timeout_s: float = 120.0):
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo CPU ranks; return results."""
    with tempfile.TemporaryDirectory(prefix="flashoptim_dist_") as tmpdir:
        ctx = mp.start_processes(
            _entry,
            args=(worker, world_size, tmpdir, args, pg_timeout_s),
            nprocs=world_size,
            join=False,
            start_method=_START_METHOD,
        )
        deadline = time.monotonic() + timeout

        def dump_live_stacks():
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, _DUMP_SIGNAL)
            time.sleep(1.0)

        try:
            while True:
                # wait here, not in ctx.join: join SIGTERMs the other ranks as soon as one fails,
                # and a library may have replaced the SIGTERM handler that dumps their stacks
                multiprocessing.connection.wait([p.sentinel for p in ctx.processes], timeout=1.0)
                failed = [i for i, p in enumerate(ctx.processes) if p.exitcode not in (None, 0)]
                if failed:
                    dump_live_stacks()  # where the others were when one failed
                    # report the rank that failed first (others may fail during the dump)
                    raise _failure(ctx, failed[0])
                if ctx.join(timeout=0.01):
                    break
                if time.monotonic() > deadline:
                    dump_live_stacks()
                    raise TimeoutError(
                        f"{getattr(worker, '__name__', worker)} on {world_size} ranks did not finish in "
                        f"{timeout:.0f} s (a hung collective?); all ranks were killed"
                    )
        except Exception as e:
            e.add_note(_stacks(tmpdir, world_size))
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmpdir, f"result{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _failure(ctx, index):
    """The exception torch's ``ProcessContext.join`` raises for failed process ``index``: its
    Python traceback if it raised, else its exit code or signal."""
    p = ctx.processes[index]
    path = ctx.error_files[index]
    if os.access(path, os.R_OK) and os.path.getsize(path) > 0:
        with open(path, "rb") as fh:
            trace = pickle.load(fh)
        return mp.ProcessRaisedException(f"\n\n-- Process {index} terminated with the following error:\n{trace}",
                                         index, p.pid)
    code = p.exitcode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return mp.ProcessExitedException(f"process {index} terminated with {how}", error_index=index,
                                     error_pid=p.pid, exit_code=code)


def _stacks(tmpdir, world_size):
    """The stacks the ranks dumped when they were stopped (see ``_entry``), for the failure message."""
    parts = []
    for rank in range(world_size):
        path = os.path.join(tmpdir, f"stack{rank}.txt")
        text = open(path).read().strip() if os.path.exists(path) else ""
        parts.append(f"--- rank {rank}: " + (text if text else "no stack dumped (it had exited or raised)"))
    return "Python stacks of the ranks when they were stopped:\n" + "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# State gathering: every rank's optimizer state, placed in canonical (global) coordinates.


def local_records(opt, named_params, group_size=32):
    """This rank's optimizer state cut into *pieces* in canonical coordinates, read through the
    same ShardSpec the optimizer used: ``{key: {"numel", "pieces": [(global_start, length,
    param, {state: elementwise slice}, {state_scales: scales of the touched groups})]}}``.
    ``key`` is the segment's key (FSDP1 FlatParameters pack several parameters) or the name.
    """
    from flashoptim_dist import layout as lay

    G = group_size
    out = {}
    for name, p in named_params:
        spec = lay.resolve_shard(p)
        local = (spec.local(p) if spec.local is not None else p).detach().reshape(-1)
        st = opt.state.get(p, {})
        soff = 0
        for seg in spec.segments:
            key = seg.key if seg.key is not None else name
            numel = seg.global_numel if seg.global_numel >= 0 else spec.global_numel
            rec = out.setdefault(key, {"numel": numel, "pieces": []})
            ng = seg.n_groups(G)
            sl = slice(seg.local_start, seg.local_start + seg.length)
            elem = {k: v[sl].clone() for k, v in st.items() if torch.is_tensor(v) and not k.endswith("_scales")}
            scales = {k: v[soff : soff + ng].clone() for k, v in st.items()
                      if torch.is_tensor(v) and k.endswith("_scales")}
            rec["pieces"].append((seg.global_start, seg.length, local[sl].clone(), elem, scales))
            soff += ng
    return out


def assemble(records_per_rank, group_size=32, skip=("<fsdp1 padding>",)):
    """Combine per-rank :func:`local_records` into global flat tensors per key:
    ``param`` and each elementwise state, ``covered`` (how many pieces cover each element),
    ``scales[state][group] = [(value, partial)]``, ``cut`` (canonical groups some rank holds only
    partially) and ``partial_per_rank``."""
    G = group_size
    keys = []
    for r in records_per_rank:
        keys += [k for k in r if k not in keys and k not in skip]
    out = {}
    for key in keys:
        recs = [r.get(key, {"numel": None, "pieces": []}) for r in records_per_rank]
        numel = next(r["numel"] for r in recs if r["numel"] is not None)
        res = {"scales": {}, "cut": set(), "partial_per_rank": [], "covered": {}}
        for rank, r in enumerate(recs):
            n_partial = 0
            for gs, n, par, elem, scales in r["pieces"]:
                for k, v in [("param", par)] + list(elem.items()):
                    if k not in res:
                        res[k] = torch.zeros(numel, dtype=v.dtype)
                        res["covered"][k] = torch.zeros(numel, dtype=torch.int32)
                    res[k][gs : gs + n] = v
                    res["covered"][k][gs : gs + n] += 1
                if n == 0:
                    continue
                ng = (gs % G + n + G - 1) // G
                for j in range(ng):
                    gidx = gs // G + j
                    lo, hi = max(gidx * G, gs), min((gidx + 1) * G, gs + n)
                    full = lo == gidx * G and hi == min((gidx + 1) * G, numel)
                    if not full:
                        res["cut"].add(gidx)
                        n_partial += 1
                    for k, v in scales.items():
                        res["scales"].setdefault(k, {}).setdefault(gidx, []).append((float(v[j]), not full))
            res["partial_per_rank"].append(n_partial)
        out[key] = res
    return out


def compare_to_reference(got, ref, *, lr, steps, max_partial_per_rank=2, aligned=(), where=""):
    """Assert the canonical-layout invariant of a sharded run against the one-device run.

    * every element is held exactly once; parameters in ``aligned`` have no cut group;
    * each rank holds at most ``max_partial_per_rank`` partial groups per key;
    * params, ρ, codes: bit-identical outside cut groups; scales of uncut groups bit-identical;
    * inside cut groups params differ by at most ``2·lr·steps`` (+ one bf16 ULP at |θ| ≤ 4).

    Returns the number of cut groups found.
    """
    G = 32
    total_cut = 0
    for key, r in ref.items():
        g = got[key]
        w = f"{where} {key}"
        numel = r["param"].numel()
        for k, cov in g["covered"].items():
            assert bool((cov == 1).all()), f"{w}: {k} not covered exactly once by the shards"
        if key in aligned:
            assert not g["cut"], f"{w}: the shards cut groups {sorted(g['cut'])} of an aligned parameter"
        assert max(g["partial_per_rank"]) <= max_partial_per_rank, (
            f"{w}: partial groups per rank {g['partial_per_rank']}"
        )
        total_cut += len(g["cut"])
        gidx = torch.arange(numel) // G
        cut_mask = torch.zeros(numel, dtype=torch.bool)
        for c in g["cut"]:
            cut_mask |= gidx == c
        for k in r:
            if k in ("scales", "cut", "partial_per_rank", "covered"):
                continue
            bad = (bits(g[k]) != bits(r[k])) & ~cut_mask
            assert not bool(bad.any()), (
                f"{w}: {k} differs from the one-device step at {int(bad.sum())} elements outside "
                f"cut groups (first at {int(bad.nonzero()[0])})"
            )
        for sk, groups in r["scales"].items():
            for gi, entries in groups.items():
                ((ref_val, _),) = entries
                sides = g["scales"][sk].get(gi)
                assert sides, f"{w}: no rank holds {sk}[{gi}]"
                if gi in g["cut"]:
                    assert len(sides) >= 2, f"{w}: cut group {gi} of {sk} has {len(sides)} side(s)"
                    continue
                assert len(sides) == 1 and sides[0][0] == ref_val, f"{w}: {sk}[{gi}] {sides} != {ref_val}"
        if cut_mask.any():
            d = (g["param"].float() - r["param"].float()).abs()[cut_mask]
            assert float(d.max()) <= 2 * lr * steps + 2**-5, f"{w}: params in cut groups differ by {float(d.max())}"
    return total_cut


def bits(t):
    """Bit pattern of a tensor as an integer tensor (exact comparison, NaN-safe)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


# ---------------------------------------------------------------------------------------------
# End-to-end training: a small transformer, a learnable synthetic task, a one-device reference.

E2E_STEPS = 20
E2E_LR = 3e-3


def tiny_gpt_config():
    from flashoptim_dist.models.gpt import GPTConfig

    # row lengths (64, 128) are multiples of 32; 1-D norm weights of 64 split evenly over 2
    return GPTConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=32)


def build_tiny_gpt(seed=0, dtype=torch.bfloat16):
    from flashoptim_dist.models.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(tiny_gpt_config())
    return model.to(dtype)


def e2e_batches(world, per_rank=4, seq=16, steps=E2E_STEPS, seed=123):
    """``steps`` global batches of (world*per_rank, seq+1) tokens: x[t+1] = (5 x[t] + 3) mod V with
    10% random tokens, so the loss falls quickly but not to zero."""
    V = tiny_gpt_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        b = world * per_rank
        x = torch.empty(b, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (b,), generator=g)
        for t in range(seq):
            x[:, t + 1] = (5 * x[:, t] + 3) % V
        noise = torch.rand(b, seq + 1, generator=g) < 0.1
        x = torch.where(noise, torch.randint(0, V, (b, seq + 1), generator=g), x)
        out.append(x)
    return out


def lm_loss(model, tokens):
    import torch.nn.functional as F

    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def rank_slice(batch, rank, world):
    n = batch.size(0) // world
    return batch[rank * n : (rank + 1) * n]


def reference_losses(batches, steps=E2E_STEPS, lr=E2E_LR, accum=1, clip=None):
    """One-device FlashAdamW run on the global batches (the curve every engine must follow)."""
    import flashoptim_dist as fo

    model = build_tiny_gpt()
    opt = fo.FlashAdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in range(steps):
        total = 0.0
        for mb in batches[step].chunk(accum):
            loss = lm_loss(model, mb) / accum
            loss.backward()
            total += float(loss.detach())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def release_refusal(model, opt):
    """The message with which enable_gradient_release refuses ``model``'s engine, or None if it
    was accepted (then it is removed again)."""
    import flashoptim_dist as fo

    try:
        handle = fo.enable_gradient_release(model, opt)
    except RuntimeError as e:
        return str(e)
    handle.remove()
    return None


def add_reference_losses(out, rank, batches, world):
    """Rank 0 adds the one-device reference curves: same batches, and the same with the global
    batch split into ``world`` accumulation steps (what data parallelism computes exactly)."""
    if rank == 0:
        out["ref"] = reference_losses(batches)
        out["ref_accum_world"] = reference_losses(batches, accum=world)
    return out
