"""HSDP (FSDP2 on a 2×2 replicate × shard mesh, 4 gloo ranks): shard invariance, training that
follows the one-device run (LOSS_TOL: tests/tolerances.py; with 4 ranks the gradient
sum order differs from one-device accumulation, so only LOSS_TOL applies), and gradient release
(the hooks run after the replicate all-reduce) equal to the normal path bit for bit."""

from __future__ import annotations

import torch

from dist_utils import (E2E_LR, E2E_STEPS, build_tiny_gpt, e2e_batches, lm_loss, rank_slice, reference_losses,
                        run_distributed)
from test_fsdp2_invariance import _invariance_worker

from tolerances import TOLERANCES as TOL  # noqa: E402

LOSS_TOL = TOL["engine_loss_vs_one_device"]


def _hsdp_worker(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import flashoptim_dist as fo
    import flashoptim_dist.distributed  # noqa: F401

    invariance = _invariance_worker(rank, world, (2, 2))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    batches = e2e_batches(world)
    out, final = {}, {}
    for release in (False, True):
        model = build_tiny_gpt()
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        assert all(tuple(p.placements) == (torch.distributed.tensor.Replicate(), torch.distributed.tensor.Shard(0))
                   for p in model.parameters())
        opt = fo.FlashAdamW(model.parameters(), lr=E2E_LR, weight_decay=0.01)
        if release:
            fo.enable_gradient_release(model, opt)
        losses = []
        for step in range(E2E_STEPS):
            loss = lm_loss(model, rank_slice(batches[step], rank, world))
            loss.backward()
            if not release:
                opt.step()
                opt.zero_grad(set_to_none=True)
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / world)
        out[release] = losses
        final[release] = [p._local_tensor.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(final[False], final[True])), f"rank {rank}: release != normal"
    if rank == 0:
        out["ref"] = reference_losses(batches)
        out["invariance"] = invariance
    return out


def test_hsdp_2x2():
    r = run_distributed(_hsdp_worker, 4, timeout=300)[0]
    # shard dim of size 2: only odd_rows (6x40, rows 3/3, boundary at element 120) is cut
    assert r["invariance"]["adamw"] == 1
    assert max(abs(a - b) for a, b in zip(r[False], r["ref"])) <= LOSS_TOL
    assert r[True] == r[False]
