"""Checkpoints under tensor parallelism (issue 15): FSDP2 + TP on a (dp 2 × tp 2) mesh, saved
both ways — ``flashoptim_dist.checkpoint`` and torch's ``get_state_dict`` + ``dcp.save`` — and
loaded on one process (a plain model), on dp 4 (FSDP2 only) and on (dp 1 × tp 2).

The model is ckpt_common's with torchtitan's plan: the embedding rowwise (its table
``Shard(0)`` over tp), ``w_in`` colwise (weight and bias ``Shard(0)``), ``w_out`` rowwise
(``Shard(1)``: 192 of 384 columns, 6 groups per row piece), the head colwise; FSDP2 on top gives
``(_StridedShard(0, 2), Shard(0))``, ``(Shard(0), Shard(1))``, and ``(Shard(0),)`` on the dp mesh
for what TP leaves alone (norms, ``bias2``, and ``cut``/``vec``, whose dim-0 shards cut groups).

Oracles (independent of the code under test), as in tests/checkpoint/test_torch_state_dict.py:

* the uninterrupted (dp 2 × tp 2) run's next step, written by ``flashoptim_dist.checkpoint.save``
  — every parameter whose shards cut no group must match bit for bit on every loading layout
  (gradients are the same full gradients, sliced by the segments: shard invariance);
* the ``flashoptim_dist.checkpoint`` route on the same loading layout — *every* tensor, cut groups
  included;
* plain DCP's reading of both checkpoints: the torch-route files hold the canonical values, the
  flashoptim_dist checkpoint of a TP run is the one of a dp-only run of the same steps.

Each fails before issue 15: the Flash optimizer refused every TP placement.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import ckpt_common as C
from dist_utils import run_distributed
from test_torch_state_dict import (_is_cut_key, _torch_route_load, assert_next_steps_agree,
                                   check_torch_files_are_canonical, make_net, next_step)

K = C.STEPS_BEFORE


def tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"emb": RowwiseParallel(), "head": ColwiseParallel()}
    for i in range(2):
        plan[f"blocks.{i}.w_in"] = ColwiseParallel()
        plan[f"blocks.{i}.w_out"] = RowwiseParallel()
    return plan


def wrap_tp(model: nn.Module, dp: int, tp: int):
    """torchtitan's order: tensor parallelism on the tp mesh dim, then fully_shard on dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    import flashoptim_dist.distributed  # noqa: F401

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], tp_plan())
    for b in model.blocks:
        fully_shard(b, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, model


def wrap_any(engine: str, model: nn.Module, world: int):
    if engine == "tp":
        return wrap_tp(model, world // 2, 2)
    return C.wrap(engine, model, world)


def _load_cases(engine, world, root, cases):
    """For each (tag, torch-route source, flashoptim_dist.checkpoint twin): load through torch's
    APIs, take step K+1, ck.save it; then the same through ck.load."""
    import torch.distributed as dist

    import flashoptim_dist.checkpoint as ck

    for tag, src, twin in cases:
        wrapped, module = wrap_any(engine, make_net(1), world)  # another init: the load must overwrite it
        opt = C.make_opt(module, lr=0.5)  # another lr: the param groups are loaded too
        _torch_route_load(module, opt, root, src, dist.get_rank())
        assert abs(opt.param_groups[0]["lr"] - 1e-2 / (1 + K)) < 1e-12, opt.param_groups[0]["lr"]
        next_step(module, opt)
        ck.save(os.path.join(root, f"t_{tag}"), wrapped, opt, step=K + 1)

        wrapped, module = wrap_any(engine, make_net(1), world)
        opt = C.make_opt(module, lr=0.5)
        ck.load(os.path.join(root, twin), wrapped, opt)
        next_step(module, opt)
        ck.save(os.path.join(root, f"f_{tag}"), wrapped, opt, step=K + 1)


def _load_worker(rank, world, engine, root, cases):
    _load_cases(engine, world, root, cases)


def _save_and_dp4(rank, world, root):
    """(dp 2 × tp 2): K steps, both saves, step K+1 (the reference); a dp-only twin of the same
    K steps; then, on the same 4 ranks, the dp 4 loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import flashoptim_dist.checkpoint as ck
    from flashoptim_dist import layout as lay

    wrapped, module = wrap_tp(make_net(0), 2, 2)
    kinds = {C.clean(n): tuple(type(pl).__name__ for pl in p.placements) for n, p in module.named_parameters()}
    segs = {C.clean(n): len(lay.resolve_shard(p).segments) for n, p in module.named_parameters()}
    opt = C.make_opt(module)
    sched = C.make_sched(opt)
    C.train_steps(module, opt, sched, range(1, K + 1))
    msd, osd = get_state_dict(module, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, "dcp_tp"))
    ck.save(os.path.join(root, "k_tp"), wrapped, opt, step=K)
    C.train_steps(module, opt, sched, [K + 1])
    ck.save(os.path.join(root, "k1_tp"), wrapped, opt, step=K + 1)

    wrapped, module = C.wrap("fsdp2", make_net(0), world)  # the same steps without TP
    opt = C.make_opt(module)
    C.train_steps(module, opt, C.make_sched(opt), range(1, K + 1))
    ck.save(os.path.join(root, "k_dp"), wrapped, opt, step=K)

    _load_cases("fsdp2", world, root, [("dp4", "dcp_tp", "k_tp")])
    return {"placements": kinds, "segments": segs}


def _dcp_boxes(path: str) -> dict:
    """key -> number of chunks DCP wrote (every rank's boxes)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(path).read_metadata()
    return {k: len(v.chunks) for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}


def test_tp_checkpoints_reshard_to_one_process_dp4_and_tp2(tmp_path):
    root = str(tmp_path)
    info = run_distributed(_save_and_dp4, 4, root, timeout=360)[0]
    # the test exercises what it claims: torchtitan's placements and a column split
    pl = info["placements"]
    assert pl["blocks.0.w_in.weight"] == ("_StridedShard", "Shard"), pl
    assert pl["blocks.0.w_out.weight"] == ("Shard", "Shard"), pl
    assert pl["emb.weight"] == ("_StridedShard", "Shard") and pl["blocks.0.norm.weight"] == ("Shard",), pl
    assert info["segments"]["blocks.0.w_out.weight"] == C.D // 2  # one segment per local row of 192 columns

    run_distributed(_load_worker, 2, "tp", root, [("tp2", "dcp_tp", "k_tp")])  # (dp 1 x tp 2)
    run_distributed(_load_worker, 1, "single", root, [("one", "dcp_tp", "k_tp")])

    # the torch-route files hold the canonical state; the TP checkpoint is the dp-only one
    shapes = {C.clean(n): tuple(p.shape) for n, p in make_net(0).named_parameters()}
    canon = C.canonical_tensors(os.path.join(root, "k_tp"))
    assert check_torch_files_are_canonical(C.read_checkpoint(os.path.join(root, "dcp_tp")), canon, shapes) > 0
    bad = [k for k in C.diff_canonical(canon, C.canonical_tensors(os.path.join(root, "k_dp"))) if not _is_cut_key(k)]
    assert not bad, f"the (dp 2 x tp 2) checkpoint differs from the dp-2 one of the same steps: {bad[:6]}"
    # one DCP box per rank and tensor for the column-split weight, not one per row
    boxes = _dcp_boxes(os.path.join(root, "k_tp"))
    assert boxes["flash.blocks.0.w_out.weight.exp_avg"] == 4, boxes
    assert boxes["flash.blocks.0.w_out.weight.exp_avg.scales"] == 4, boxes
    assert tuple(canon["flash.blocks.0.w_out.weight.exp_avg.scales"].shape) == (C.D, C.H // 32)

    ref = assert_next_steps_agree(root, ("dp4", "tp2", "one"), "k1_tp")
    t = C.canonical_tensors(os.path.join(root, "t_one"))  # the column-split weight's state, after a reshard
    assert torch.equal(C.bits(t["flash.blocks.1.w_out.weight.exp_avg_sq"]),
                       C.bits(ref["flash.blocks.1.w_out.weight.exp_avg_sq"]))
