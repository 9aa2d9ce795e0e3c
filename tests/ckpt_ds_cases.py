"""DeepSpeed ZeRO cases of the checkpoint tests (one launch of 2 CPU ranks runs them all).

Launched by tests/checkpoint/test_checkpoint_dist.py as
``deepspeed --num_gpus 2 tests/ckpt_ds_cases.py --out RESULTS.json --root DIR --cases a,b``
with ``DS_ACCELERATOR=cpu``. Rank 0 writes one JSON record per case ({"error": traceback} when a
case raised); the pytest side asserts on them.

Cases:
* ``from_fsdp2_z{1,2,3}``: load the checkpoint that 4 FSDP2 ranks wrote (``DIR/k``) into a ZeRO
  engine, check every local state element against the canonical file, take the next step with
  the same full gradients (handed to the client optimizer partition by partition, as ZeRO does)
  and save ``DIR/k1_zero{stage}``; then a real engine step (training continues).
* ``native_z{2,3}``: a checkpoint written by ``engine.save_checkpoint`` (for ``ckpt convert``).
* ``zero2_cut``: train the odd-sized ds_model under ZeRO-2 (real steps, fragments cut groups),
  save ``DIR/z2``; load it into ZeRO-3 (other cuts), check, save ``DIR/z2_z3``.
* ``gpt_round_robin_z2``: the trainer's GPT (tiny preset) under ZeRO-2 with
  ``round_robin_gradients`` (DeepSpeed reorders the flat buffer, its ``_hp_mapping`` does not
  follow): 2 real steps, save ``DIR/gpt_rr``; rank 0 dumps the engine's own full bf16 parameters
  (``DIR/gpt_rr_live.pt``, ZeRO-2 keeps a full copy on every rank) as the oracle; then a fresh
  engine loads the checkpoint and dumps its parameters too (``DIR/gpt_rr_loaded.pt``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ckpt_common as C  # noqa: E402
import flashoptim_dist.checkpoint as ck  # noqa: E402
import flashoptim_dist.deepspeed as fds  # noqa: E402
from flashoptim_dist.checkpoint._views import build_view  # noqa: E402

K = C.STEPS_BEFORE


def _cfg(stage, **opt):
    return {
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, **({"sub_group_size": 20000} if stage == 3 else {})},
        "optimizer": {"type": "FlashAdamW", "params": {"lr": 0.5, "weight_decay": 0.1, **opt}},
        "steps_per_print": 100000,
    }


def synthetic_step(engine, step):
    """Give the client optimizer each flat partition with its slice of the full gradients of
    ``step`` (ckpt_common.full_grad) and step it, sub-group by sub-group like ZeRO does."""
    view = build_view(engine, engine.optimizer)
    client = view.client
    zopt = engine.optimizer
    stage = fds.zero_stage_of(zopt)
    for ti in view.tensors:
        g = torch.zeros(ti.local.numel(), dtype=ti.local.dtype)
        for si in ti.segs:
            full = C.full_grad(si.fqn, view.params[si.fqn].global_shape, step).reshape(-1)
            g[si.seg.local_start : si.seg.local_start + si.seg.length] = full[
                si.seg.global_start : si.seg.global_start + si.seg.length
            ]
        ti.tensor.grad = g
    if stage == 3:
        for ti in view.tensors:
            saved = client.param_groups[ti.group]["params"]
            client.param_groups[ti.group]["params"] = [ti.tensor]
            client.step()
            client.param_groups[ti.group]["params"] = saved
    else:
        client.step()
    for ti in view.tensors:
        ti.tensor.grad = None


def real_step(engine, step):
    x, y = C.batch(step)
    logits = engine(x)
    loss = F.cross_entropy(logits.float().reshape(-1, C.VOCAB), y.reshape(-1))
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def case_from_fsdp2(stage, root):
    engine, _, _, _ = fds.initialize(model=C.make_net(1), config=_cfg(stage))
    client = build_view(engine, engine.optimizer).client
    sched = C.make_sched(client)
    res = ck.load(os.path.join(root, "k"), engine, engine.optimizer, lr_scheduler=sched)
    canon = C.canonical_tensors(os.path.join(root, "k"))
    n = C.check_local_state_equals(canon, engine, engine.optimizer)
    lr = client.param_groups[0]["lr"]
    synthetic_step(engine, K + 1)
    sched.step()
    with torch.no_grad():
        engine.module.seen += 1  # as ckpt_common.train_steps does
    ck.save(os.path.join(root, f"k1_zero{stage}"), engine, engine.optimizer, lr_scheduler=sched, step=K + 1)
    loss = real_step(engine, 0)
    engine.destroy()
    return {"n": n, "lr": lr, "loss": loss, "extra": res["extra"], "saved_world": res["saved_world_size"],
            "step": res["step"]}


def case_zero2_cut(root):
    from ds_model import batch, make_model

    cfg = json.load(open(os.path.join(os.path.dirname(HERE), "configs", "ds_test_zero2.json")))
    engine, _, _, _ = fds.initialize(model=make_model(), config=cfg)
    for step in range(3):
        for micro in range(2):
            x, y = batch(step, micro, dist.get_rank(), 4)
            engine.backward(engine(x, y))
            engine.step()
    view = build_view(engine, engine.optimizer)
    cut = 0
    for ti in view.tensors:
        for si in ti.segs:
            n = view.params[si.fqn].numel
            cut += int(si.seg.global_start % 32 != 0) + int((si.seg.global_start + si.seg.length) % 32 != 0
                                                          and si.seg.global_start + si.seg.length != n)
    info = ck.save(os.path.join(root, "z2"), engine, engine.optimizer, step=3)
    engine.destroy()
    cfg3 = json.load(open(os.path.join(os.path.dirname(HERE), "configs", "ds_test_zero3.json")))
    engine3, _, _, _ = fds.initialize(model=make_model(seed=123), config=cfg3)
    ck.load(os.path.join(root, "z2"), engine3, engine3.optimizer)
    n = C.check_local_state_equals(C.canonical_tensors(os.path.join(root, "z2")), engine3, engine3.optimizer)
    ck.save(os.path.join(root, "z2_z3"), engine3, engine3.optimizer, step=3)
    x, y = batch(3, 0, dist.get_rank(), 4)
    loss = engine3(x, y)
    engine3.backward(loss)
    engine3.step()
    engine3.destroy()
    return {"cut_boundaries": cut, "n": n, "loss": float(loss.detach()), "bytes_per_param": info["bytes_per_param"]}


def case_gpt_round_robin(root):
    from flashoptim_dist.models.gpt import GPT, preset

    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
        "zero_optimization": {"stage": 2, "round_robin_gradients": True},
        "optimizer": {"type": "FlashAdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }

    def build(seed):
        torch.manual_seed(seed)
        model = GPT(preset("tiny", max_seq_len=32))
        return fds.initialize(model=model, config=cfg)[0]

    engine = build(0)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(2):
        x = torch.randint(0, 256, (2, 17), generator=g)
        loss = F.cross_entropy(engine(x[:, :-1]).float().reshape(-1, 256), x[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    path = os.path.join(root, "gpt_rr")
    ck.save(path, engine, engine.optimizer, step=2)
    if dist.get_rank() == 0:
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, path + "_live.pt")
    engine.destroy()
    engine2 = build(1)
    ck.load(path, engine2, engine2.optimizer)
    n = C.check_local_state_equals(C.canonical_tensors(path), engine2, engine2.optimizer)
    if dist.get_rank() == 0:
        torch.save({n: p.detach().clone() for n, p in engine2.module.named_parameters()}, path + "_loaded.pt")
    engine2.destroy()
    return {"n": n, "loss": float(loss.detach())}


def case_native(stage, root):
    """A checkpoint written by DeepSpeed itself (engine.save_checkpoint) for the converter."""
    from ds_model import batch, make_model

    cfg = json.load(open(os.path.join(os.path.dirname(HERE), "configs", f"ds_test_zero{stage}.json")))
    engine, _, _, _ = fds.initialize(model=make_model(), config=cfg)
    for step in range(2):
        for micro in range(2):
            x, y = batch(step, micro, dist.get_rank(), 4)
            engine.backward(engine(x, y))
            engine.step()
    engine.save_checkpoint(os.path.join(root, f"ds_native_z{stage}"), tag="t")
    engine.destroy()
    return {"ok": True}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--cases", default="all")
    ap.add_argument("--local_rank", type=int, default=0)
    a, _ = ap.parse_known_args()
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("CKPT_DS_DUMP_AFTER_S", "400")), exit=True)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    plan = [(f"from_fsdp2_z{s}", lambda s=s: case_from_fsdp2(s, a.root)) for s in (1, 2, 3)]
    plan.append(("zero2_cut", lambda: case_zero2_cut(a.root)))
    plan.append(("gpt_round_robin_z2", lambda: case_gpt_round_robin(a.root)))
    plan += [(f"native_z{s}", lambda s=s: case_native(s, a.root)) for s in (2, 3)]
    todo = a.cases.split(",")
    from ds_model import run_case_plan

    run_case_plan(plan, todo, a.out, {"deepspeed": deepspeed.__version__})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
