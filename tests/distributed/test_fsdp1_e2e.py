"""FSDP1 end to end on 2 gloo ranks (tolerances: tests/tolerances.py), and its errors:
an original parameter that prepare_fsdp1 did not prepare, and gradient release under FSDP1."""

from __future__ import annotations

import torch

from dist_utils import (
    E2E_LR,
    E2E_STEPS,
    add_reference_losses,
    build_tiny_gpt,
    e2e_batches,
    lm_loss,
    rank_slice,
    release_refusal,
    run_distributed,
)

from tolerances import TOLERANCES as TOL  # noqa: E402

LOSS_TOL = TOL["engine_loss_vs_one_device"]
EXACT_TOL = TOL["engine_loss_vs_accumulated"]


def _wrap(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from flashoptim_dist.models.gpt import Block

    return FSDP(
        build_tiny_gpt(),
        auto_wrap_policy=ModuleWrapPolicy({Block}),
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )


def _train(rank, world, model, batches):
    import torch.distributed as dist

    import flashoptim_dist as fo

    opt = fo.FlashAdamW(model.parameters(), lr=E2E_LR, weight_decay=0.01)
    losses = []
    for step in range(E2E_STEPS):
        loss = lm_loss(model, rank_slice(batches[step], rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses


def _fsdp1_worker(rank, world):
    import flashoptim_dist as fo
    from flashoptim_dist.distributed import prepare_fsdp1

    batches = e2e_batches(world)
    out = {}
    model = _wrap(True)
    assert prepare_fsdp1(model) == len(list(model.parameters()))
    out["orig"] = _train(rank, world, model, batches)
    out["flat"] = _train(rank, world, _wrap(False), batches)
    # errors
    try:
        fo.FlashAdamW(_wrap(True).parameters(), lr=1e-3)
        out["unprepared"] = None
    except RuntimeError as e:
        out["unprepared"] = str(e)
    model = _wrap(True)
    prepare_fsdp1(model)
    opt = fo.FlashAdamW(model.parameters(), lr=1e-3)
    out["release"] = release_refusal(model, opt)
    return add_reference_losses(out, rank, batches, world)


def test_fsdp1_training_and_errors():
    r = run_distributed(_fsdp1_worker, 2)[0]
    for kind in ("orig", "flat"):
        assert max(abs(a - b) for a, b in zip(r[kind], r["ref"])) <= LOSS_TOL, kind
        assert max(abs(a - b) for a, b in zip(r[kind], r["ref_accum_world"])) <= EXACT_TOL, kind
    m = r["unprepared"]
    assert m is not None and "prepare_fsdp1(fsdp_model)" in m and "use_orig_params=True" in m, m
    m = r["release"]
    assert m is not None and "FSDP1" in m and "never fire" in m and "fully_shard" in m, m
