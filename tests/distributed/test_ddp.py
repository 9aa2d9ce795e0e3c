"""DDP and plain replicated training on 2 gloo ranks: whole tensors, as on one device
(tolerances: tests/tolerances.py). Gradient release under DDP is refused with a
message (the hook would see the un-averaged local gradient)."""

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


def _ddp_worker(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flashoptim_dist as fo
    import flashoptim_dist.distributed  # noqa: F401  (registers the release check)

    batches = e2e_batches(world)
    out = {}
    for mode in ("ddp", "manual"):
        model = build_tiny_gpt()
        wrapped = DDP(model) if mode == "ddp" else model
        opt = fo.FlashAdamW(wrapped.parameters(), lr=E2E_LR, weight_decay=0.01)
        losses = []
        for step in range(E2E_STEPS):
            loss = lm_loss(wrapped, rank_slice(batches[step], rank, world))
            loss.backward()
            if mode == "manual":  # plain replication: average the gradients yourself
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / world)
        # replicas stay identical
        for p in model.parameters():
            ps = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(ps, p.detach())
            assert all(torch.equal(ps[0], q) for q in ps[1:]), f"{mode}: replicas diverged"
        out[mode] = losses
    model = DDP(build_tiny_gpt())
    opt = fo.FlashAdamW(model.parameters(), lr=1e-3)
    out["release"] = release_refusal(model, opt)
    return add_reference_losses(out, rank, batches, world)


def test_ddp_and_replicated_training_match_one_device():
    r = run_distributed(_ddp_worker, 2)[0]
    for mode in ("ddp", "manual"):
        assert max(abs(a - b) for a, b in zip(r[mode], r["ref"])) <= LOSS_TOL, mode
        assert max(abs(a - b) for a, b in zip(r[mode], r["ref_accum_world"])) <= EXACT_TOL, mode
    m = r["release"]
    assert m is not None, "gradient release under DDP must be refused"
    for part in ("gradient release does not work under DistributedDataParallel", "before DDP's bucketed all-reduce",
                 "optimizer.step()", "fully_shard"):
        assert part in m, m


def test_release_check_accepts_single_device():
    import flashoptim_dist as fo
    import flashoptim_dist.distributed  # noqa: F401

    model = build_tiny_gpt()
    opt = fo.FlashAdamW(model.parameters(), lr=1e-3)
    handle = fo.enable_gradient_release(model, opt)
    lm_loss(model, e2e_batches(1, steps=1)[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    handle.remove()


def _single_device_run(release_mode, norm_type, steps=4, max_norm=0.05):
    import flashoptim_dist as fo
    from flashoptim_dist.distributed import clip_coefficient, enable_gradient_release_with_clipping, grad_norm

    model = build_tiny_gpt()
    params = list(model.parameters())
    opt = fo.FlashAdamW(params, lr=E2E_LR)
    handle = None
    if release_mode:
        handle = enable_gradient_release_with_clipping(model, opt, max_norm, norm_type=norm_type, mode=release_mode)
    batches = e2e_batches(1, steps=steps)
    coef_prev, norms = None, []
    for step in range(steps):
        if release_mode == "two_pass":
            with handle.measure():
                lm_loss(model, batches[step]).backward()
        lm_loss(model, batches[step]).backward()
        if handle is not None:
            norms.append(handle.last_norm)
            continue
        n = grad_norm(params, norm_type)
        if coef_prev is not None:  # normal path, clipped by the previous step's norm
            for p in params:
                p.grad.mul_(coef_prev)
        coef_prev = clip_coefficient(n, max_norm)
        norms.append(float(n))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms, [p.detach().clone() for p in params]


def test_release_clipping_previous_norm_single_device_inf_norm():
    ref_norms, ref_params = _single_device_run(None, float("inf"))
    norms, params = _single_device_run("previous", float("inf"))
    assert norms == ref_norms and max(norms) > 0.05  # inf-norm clipping is active
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    # clipping changes the run (the comparison is not vacuous)
    unclipped = _single_device_run(None, float("inf"), max_norm=1e9)[1]
    assert not all(torch.equal(a, b) for a, b in zip(params, unclipped))


def test_two_pass_clipping_requires_a_measuring_pass():
    import pytest

    import flashoptim_dist as fo
    from flashoptim_dist.distributed import enable_gradient_release_with_clipping

    model = build_tiny_gpt()
    opt = fo.FlashAdamW(model.parameters(), lr=E2E_LR)
    enable_gradient_release_with_clipping(model, opt, 1.0, mode="two_pass")
    with pytest.raises(RuntimeError, match="inside `with handle.measure\\(\\):`"):
        lm_loss(model, e2e_batches(1, steps=1)[0]).backward()
    with pytest.raises(RuntimeError, match="clipping hooks must run before the release hooks"):
        enable_gradient_release_with_clipping(model, opt, 1.0)
