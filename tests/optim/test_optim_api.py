"""torch.optim behaviour of the Flash optimizers: groups, closures, schedulers, state dicts,
interop, memory accounting, gradient release, helpers and bad input."""

import copy

import pytest
import torch
from torch import nn

import flashoptim_dist as F


def _model(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(dtype)


def _train(model, opt, steps=5, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def test_param_groups_have_their_own_hyperparameters():
    m = _model()
    opt = F.FlashAdamW([{"params": m[0].parameters(), "lr": 1e-2},
                        {"params": m[2].parameters(), "lr": 0.0, "weight_decay": 0.0}])
    before = [p.detach().clone() for p in m[2].parameters()]
    _train(m, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, m[2].parameters()))  # lr 0: untouched
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.0


def test_add_param_group_and_params_without_grads_get_no_state():
    m = _model()
    extra = nn.Parameter(torch.randn(10).bfloat16())
    frozen = nn.Parameter(torch.randn(4).bfloat16())
    opt = F.FlashAdamW(m.parameters())
    opt.add_param_group({"params": [extra, frozen], "lr": 1e-3})
    extra.grad = torch.randn(10).bfloat16()
    opt.step()
    assert opt.state[extra]["step"] == 1
    assert frozen not in opt.state or "step" not in opt.state[frozen]
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        opt.add_param_group({"params": [extra]})


def test_closure_and_lr_scheduler():
    m = _model()
    opt = F.FlashSGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 32).bfloat16()

    def closure():
        opt.zero_grad()
        loss = m(x).float().pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_zero_size_params_work():
    p = nn.Parameter(torch.zeros(0, 5).bfloat16())
    q = nn.Parameter(torch.randn(3).bfloat16())
    opt = F.FlashAdamW([p, q])
    p.grad = torch.zeros(0, 5).bfloat16()
    q.grad = torch.randn(3).bfloat16()
    opt.step()
    assert opt.state[p]["rho"].numel() == 0 and opt.state[p]["exp_avg_scales"].numel() == 0


def test_fp32_and_fp16_params():
    p32 = nn.Parameter(torch.randn(100))
    p16 = nn.Parameter(torch.randn(100).half())
    opt = F.FlashAdamW([p32, p16], lr=1e-2)
    p32.grad, p16.grad = torch.randn(100), torch.randn(100).half()
    opt.step()
    assert "rho" not in opt.state[p32] and opt.state[p32]["exp_avg"].dtype == torch.int8
    assert opt.state[p16]["rho"].dtype == torch.int8


def test_memory_accounting_adamw24_state_bytes_per_param():
    m = nn.Linear(1024, 1024).bfloat16()
    opt = F.FlashAdamW(m.parameters())
    _ = m(torch.randn(2, 1024).bfloat16()).sum().backward()
    opt.step()
    n = sum(p.numel() for p in m.parameters())
    per_param = opt.state_bytes() / n
    assert per_param <= 3.2, per_param  # ρ 1 + m 1 + v 1 + 2 bf16 scales / 32
    # every byte counted by hand from the state tensors
    manual = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert manual == opt.state_bytes()
    assert F.FlashAdamW(nn.Linear(8, 8).bfloat16().parameters(), master_weight_bits=32).config.master_weight_bits == 32


def test_state_dict_round_trip_is_bit_exact_and_keeps_dtypes():
    m = _model()
    opt = F.FlashAdamW(m.parameters(), lr=1e-2)
    _train(m, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["flashoptim"]["format_version"] == 3
    m2 = copy.deepcopy(m)
    opt2 = F.FlashAdamW(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for k, v in opt.state[p].items():
            v2 = opt2.state[p2][k]
            if torch.is_tensor(v):
                assert v2.dtype == v.dtype, k  # torch's loader would have cast codes to bf16
                assert torch.equal(_bits(v), _bits(v2)), k
            else:
                assert v == v2
    # continuing from the loaded state equals continuing the original
    l1 = _train(m, opt, 3, seed=5)
    l2 = _train(m2, opt2, 3, seed=5)
    assert l1 == l2
    assert all(torch.equal(_bits(a.detach()), _bits(b.detach())) for a, b in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("how", ["meta", "dcp"])
def test_version_2_state_dict_with_linear_rho_converts_on_load(how):
    """State dicts of format version ≤ 2 hold the bf16 ρ in the paper's linear form. With the
    "flashoptim" entry saying version 2 (``how="meta"``: torch.save, DeepSpeed, Accelerate,
    Lightning) load_state_dict converts it; without it (``"dcp"``: torch's
    get_optimizer_state_dict drops the entry) it cannot tell, and upgrade_linear_rho() converts.
    Either way the masters come back within one 24-bit step. Read as the bit split instead, the
    masters whose θ' is a power of two with ρ < 0 are off by up to 64 steps (below a power of two
    the bit spacing halves; elsewhere the two forms differ by < 1 step)."""
    import ckpt_common as C

    m = _model()
    opt = F.FlashAdamW(m.parameters(), lr=1e-2)
    _train(m, opt, 3)
    masters = {p: F.numerics.merge_master(p.detach().reshape(-1), opt.state[p]["rho"]) for p in m.parameters()}
    sd = copy.deepcopy(opt.state_dict())
    for i, p in enumerate(m.parameters()):
        sd["state"][i]["rho"] = C.linear_rho(p.detach(), masters[p]).view(sd["state"][i]["rho"].shape)
    if how == "meta":
        sd["flashoptim"]["format_version"] = 2
    else:
        del sd["flashoptim"]
    m2 = copy.deepcopy(m)
    opt2 = F.FlashAdamW(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)

    def worst():
        return max(C.master_gap_in_24bit_steps(F.numerics.merge_master(p2.detach().reshape(-1),
                                                                       opt2.state[p2]["rho"]), masters[p])
                   for p, p2 in zip(m.parameters(), m2.parameters()))

    if how == "dcp":
        assert worst() >= 4  # read as the bit split
        assert opt2.upgrade_linear_rho() == len(list(m.parameters()))
    assert worst() <= 1
    # and it trains on
    _train(m2, opt2, 1)


def test_flash_state_without_meta_key_still_loads_exactly():
    """DCP's get_optimizer_state_dict drops the "flashoptim" key; the codes must not be
    mistaken for torch moments and re-quantized."""
    m = _model()
    opt = F.FlashAdamW(m.parameters(), lr=1e-2)
    _train(m, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    del sd["flashoptim"]
    opt2 = F.FlashAdamW(copy.deepcopy(m).parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    for p, p2 in zip(m.parameters(), opt2.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert opt2.state[p2][k].dtype == v.dtype and torch.equal(_bits(v), _bits(opt2.state[p2][k]))


def test_load_state_dict_rejects_mismatched_numerics_and_models():
    m = _model()
    opt = F.FlashAdamW(m.parameters())
    _train(m, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="master_weight_bits=24 but this optimizer has master_weight_bits=32"):
        F.FlashAdamW(copy.deepcopy(m).parameters(), master_weight_bits=32).load_state_dict(sd)
    with pytest.raises(ValueError, match="'adam'-family"):
        F.FlashLion(copy.deepcopy(m).parameters()).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["flashoptim"]["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        F.FlashAdamW(copy.deepcopy(m).parameters()).load_state_dict(bad)
    other = nn.Sequential(nn.Linear(32, 65), nn.ReLU(), nn.Linear(65, 8)).bfloat16()
    with pytest.raises(ValueError, match="different model"):
        F.FlashAdamW(other.parameters()).load_state_dict(sd)


def test_load_state_dict_rejects_scales_no_encoder_writes():
    """Corrupted scales (negative, non-finite, a √v scale above 2^64 — the √v decoder's domain)
    are refused on load with the key named, and the optimizer's own state still loads."""
    m = _model()
    opt = F.FlashAdamW(m.parameters())
    _train(m, opt, 1)
    sd = opt.state_dict()
    F.FlashAdamW(copy.deepcopy(m).parameters()).load_state_dict(copy.deepcopy(sd))
    for key, value in (("exp_avg_sq_scales", 2.0**70), ("exp_avg_scales", -1.0), ("exp_avg_scales", float("inf")),
                       ("exp_avg_sq_scales", float("nan"))):
        bad = copy.deepcopy(sd)
        bad["state"][0][key].view(-1)[0] = value
        with pytest.raises(ValueError, match=f"{key}.*corrupted"):
            F.FlashAdamW(copy.deepcopy(m).parameters()).load_state_dict(bad)


def test_interop_load_plain_torch_adamw_state_quantized():
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        ref(torch.randn(8, 64)).pow(2).mean().backward()
        topt.step()
        topt.zero_grad()
    m = copy.deepcopy(ref).bfloat16()
    opt = F.FlashAdamW(m.parameters(), lr=1e-2)
    opt.load_state_dict(topt.state_dict())
    for p, tp in zip(m.parameters(), ref.parameters()):
        dq = opt.dequantized_state(p)
        ts = topt.state[tp]
        assert opt.state[p]["step"] == 3
        assert torch.allclose(dq["exp_avg"], ts["exp_avg"].float(), rtol=0, atol=float(ts["exp_avg"].abs().max()) / 100)
        assert torch.allclose(dq["exp_avg_sq"], ts["exp_avg_sq"], rtol=0, atol=float(ts["exp_avg_sq"].max()) / 100)
    _train_one = m(torch.randn(2, 64).bfloat16()).float().sum()
    _train_one.backward()
    opt.step()  # and it trains on


def test_plain_torch_sgd_state_keeps_its_momentum_in_flash_sgd():
    """torch.optim.SGD's state has a momentum buffer but no step count: loaded into FlashSGD
    (fp32 moments, 32-bit masters: torch's math to fp32 rounding) the next step must use that
    buffer, as torch's own next step does, not restart it from the gradient."""
    m = _model(dtype=torch.float32)
    topt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _train(m, topt, 3, dtype=torch.float32)
    m2 = copy.deepcopy(m)
    fopt = F.FlashSGD(m2.parameters(), lr=0.1, momentum=0.9, quantize=False, master_weight_bits=32)
    fopt.load_state_dict(topt.state_dict())
    _train(m, topt, 1, dtype=torch.float32, seed=5)
    _train(m2, fopt, 1, dtype=torch.float32, seed=5)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_interop_export_to_plain_torch():
    m = _model(dtype=torch.float32)
    opt = F.FlashSGD(m.parameters(), lr=0.1, momentum=0.9)
    _train(m, opt, 3, dtype=torch.float32)
    sd = opt.torch_state_dict()
    topt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    topt.load_state_dict(sd)
    for p in m.parameters():
        assert topt.state[p]["momentum_buffer"].dtype == torch.float32
        assert torch.allclose(topt.state[p]["momentum_buffer"], opt.dequantized_state(p)["momentum_buffer"])
    m2 = _model(dtype=torch.float32)
    opt2 = F.FlashAdamW(m2.parameters())
    _train(m2, opt2, 2, dtype=torch.float32)
    t2 = torch.optim.AdamW(m2.parameters())
    t2.load_state_dict(opt2.torch_state_dict())
    t2.step()


def test_gradient_release_matches_normal_path_and_remove_restores():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = F.FlashAdamW(m1.parameters(), lr=1e-2)
    o2 = F.FlashAdamW(m2.parameters(), lr=1e-2)
    handle = F.enable_gradient_release(m2, o2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(8, 32, generator=g).bfloat16()
        m1(x).float().pow(2).mean().backward()
        o1.step()
        o1.zero_grad()
        m2(x).float().pow(2).mean().backward()
        assert all(p.grad is None for p in m2.parameters())  # freed inside backward
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))
    with pytest.raises(RuntimeError, match="gradient release is active"):
        o2.step()
    handle.remove()
    m2(torch.randn(2, 32).bfloat16()).float().sum().backward()
    assert all(p.grad is not None for p in m2.parameters())
    o2.step()


def test_gradient_release_errors():
    with pytest.raises(TypeError, match="needs a Flash optimizer"):
        F.enable_gradient_release(_model(), torch.optim.SGD(_model().parameters(), lr=1))
    m16 = _model(dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        F.enable_gradient_release(m16, F.FlashAdamW(m16.parameters()))
    m = _model()
    with pytest.raises(ValueError, match="not in the model"):
        F.enable_gradient_release(m, F.FlashAdamW(_model().parameters()))
    opt = F.FlashAdamW(m.parameters())
    F.enable_gradient_release(m, opt)
    with pytest.raises(RuntimeError, match="already enabled"):
        F.enable_gradient_release(m, opt)


def test_cast_model_keeps_running_stats_and_patterns_fp32():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.LayerNorm(2))
    F.cast_model(m, torch.bfloat16, keep_fp32=["3"])
    assert m[0].weight.dtype == torch.bfloat16 and m[2].weight.dtype == torch.bfloat16
    assert m[1].weight.dtype == torch.float32 and m[1].running_mean.dtype == torch.float32
    assert m[3].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        F.cast_model(m, torch.int8)


def test_numerics_check_flags_too_small_lr():
    """At |θ| = 100 a 24-bit master moves in ρ steps of 2e-3: round-to-nearest loses lr 1e-6
    entirely, stochastic rounding resolves 2^-15 of a step (6e-8) and loses only lr 1e-9."""
    def step(lr, **kw):
        p = nn.Parameter(torch.full((64,), 100.0).bfloat16())
        opt = F.FlashAdamW([p], lr=lr, check_numerics=True, **kw)
        p.grad = torch.ones(64).bfloat16()
        opt.step()

    with pytest.raises(ValueError, match="too small.*rounding='nearest'"):
        step(1e-6, rounding="nearest")
    step(1e-6)
    with pytest.raises(ValueError, match="too small"):
        step(1e-9)
    step(1e-2, rounding="nearest")


def test_numerics_check_judges_the_peak_lr_not_the_warmup():
    """Warm-up from 0 (and torch's lr = 0 state initialisation) defers the check; a scheduler's
    ``initial_lr`` (the peak) is what is judged, so a warm-up's first tiny rate does not fail."""
    p = nn.Parameter(torch.full((64,), 1.0).bfloat16())
    opt = F.FlashAdamW([p], lr=1e-4, check_numerics=True, rounding="nearest")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 1000)  # lr 0, then 1e-7, ...
    for _ in range(3):
        p.grad = torch.ones(64).bfloat16()
        opt.step()  # lr 0 first: deferred; then 1e-7 < resolution 3e-5 but the peak 1e-4 passes
        sched.step()
    q = nn.Parameter(torch.full((64,), 1.0).bfloat16())
    bad = F.FlashAdamW([q], lr=1e-6, check_numerics=True, rounding="nearest")
    q.grad = torch.ones(64).bfloat16()
    bad.param_groups[0]["lr"] = 0.0  # torch's _init_optim_state: a step at lr 0 judges nothing
    bad.step()
    bad.param_groups[0]["lr"] = 1e-6
    torch.optim.lr_scheduler.LambdaLR(bad, lambda s: s / 1000)  # records the peak, sets lr 0
    with pytest.raises(ValueError, match="too small"):
        bad.step()  # the peak 1e-6 on weights of 1 with nearest rounding: frozen


def test_without_ecc_small_updates_are_lost_and_with_ecc_they_accumulate():
    """Why ρ exists: 100 updates of 1e-4 on weights of 1.0 vanish in bf16 but not with ρ."""
    results = {}
    for bits in (None, 24, 32):
        p = nn.Parameter(torch.ones(64).bfloat16())
        opt = F.FlashSGD([p], lr=1e-4, master_weight_bits=bits)
        for _ in range(100):
            p.grad = torch.ones(64).bfloat16()
            opt.step()
        results[bits] = float(opt.master_params()[0].mean())
    exact = 1.0 - 100 * 1e-4
    assert results[None] == 1.0  # every update is below half a bf16 ULP: all lost
    # 24-bit: each step re-rounds the master to u/(2·127) (u = 2^-8 below 1.0): ≤ u/508 per step
    assert abs(results[24] - exact) <= 100 * 2.0**-8 / 508
    assert abs(results[24] - exact) < 0.05 * 100 * 1e-4  # 95% of the movement kept
    fp32 = torch.ones(())
    for _ in range(100):
        fp32 = fp32 + (-1e-4) * torch.ones(())  # what an fp32 master does
    assert abs(results[32] - float(fp32)) < 1e-6


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(betas=(1.0, 0.9)), "Invalid beta1"),
    (dict(eps=-1e-8), "Invalid epsilon"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(master_weight_bits=16), "master_weight_bits must be 24"),
    (dict(group_size=30), "power of two"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(differentiable=True), "not differentiable"),
    (dict(bogus=1), "unexpected keyword"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        F.FlashAdamW(_model().parameters(), **kwargs)


def test_sgd_nesterov_requires_momentum():
    with pytest.raises(ValueError, match="Nesterov"):
        F.FlashSGD(_model().parameters(), nesterov=True)


def test_bad_parameters_and_gradients():
    with pytest.raises(TypeError, match="Integer and complex"):
        F.FlashAdamW([torch.zeros(3, dtype=torch.int64)])
    nc = nn.Parameter(torch.randn(8, 6).bfloat16().t())
    with pytest.raises(ValueError, match="contiguous"):
        F.FlashAdamW([nc])
    emb = nn.Embedding(10, 4, sparse=True).bfloat16()
    opt = F.FlashAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).float().sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="backend='triton'"):
        F.FlashAdamW([nn.Parameter(torch.randn(4).bfloat16())], backend="triton")._step_items(
            [(p, g) for g in [{"params": []}] for p in []]
        ) or _triton_on_cpu_without_interpreter()


def _triton_on_cpu_without_interpreter():
    import os

    from flashoptim_dist.optim.base import _triton_usable

    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        _triton_usable(torch.device("cpu"), "triton")
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def test_nan_gradient_is_contained_in_its_element():
    p = nn.Parameter(torch.randn(96).bfloat16())
    opt = F.FlashAdamW([p], lr=1e-2)
    g = torch.randn(96).bfloat16()
    g[40] = float("nan")
    p.grad = g
    opt.step()
    st = opt.state[p]
    assert torch.isnan(p[40].float())
    finite = torch.cat([p[:40], p[41:]]).float()
    assert bool(torch.isfinite(finite).all())
    assert int(st["rho"][40]) == 0 and int(st["exp_avg"][40]) == 0
    assert bool(torch.isfinite(st["exp_avg_scales"].float()).all())


@pytest.mark.parametrize("first_chunk", [8, 1])
def test_steady_step_path_is_the_general_path(monkeypatch, first_chunk):
    """After the first step, step() reuses the previous step's per-parameter bookkeeping when
    only the gradients changed. Same results bit for bit as the general path, and it falls back
    (and rebuilds) whenever something else changed: a missing gradient, another grad dtype, a
    loaded state dict, a new param group. With first_chunk=1 the parameters are stepped in
    chunks of 1, 2, 4, ... and the change is found after earlier chunks were already launched."""
    from flashoptim_dist.optim import base

    monkeypatch.setattr(base, "FIRST_CHUNK", first_chunk)
    fast, slow = _model(), _model()
    o_fast, o_slow = F.FlashAdamW(fast.parameters(), lr=1e-2), F.FlashAdamW(slow.parameters(), lr=1e-2)
    o_slow._steady_step = lambda: False  # always the general path
    used = []
    steady = o_fast._steady_step
    o_fast._steady_step = lambda: used.append(steady()) or used[-1]

    def step(skip=None, dtype=torch.bfloat16):
        for m in (fast, slow):
            for i, p in enumerate(m.parameters()):
                if dtype != p.dtype and hasattr(p, "grad_dtype"):
                    p.grad_dtype = None  # torch >= 2.12 checks grad dtypes unless told not to
                p.grad = None if i == skip else torch.randn(
                    p.shape, generator=torch.Generator().manual_seed(i + 7 * len(used))).to(dtype)
        o_fast.step()
        o_slow.step()

    for _ in range(3):
        step()
    step(skip=1)  # a parameter without gradient: not stepped, its step count stays
    step()
    step()
    step(dtype=torch.float32)  # fp32 grads on bf16 params: another launch combination
    step()
    o_fast.load_state_dict(o_fast.state_dict())
    o_slow.load_state_dict(o_slow.state_dict())
    step()
    step()
    # (with chunks of 1, the missing gradient is found in the second chunk: that step is
    # finished by the general path and counts as steady)
    assert used.count(True) >= 4 and used.count(False) >= (3 if first_chunk > 1 else 2), used
    for a, b in zip(fast.parameters(), slow.parameters()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for a, b in zip(fast.parameters(), slow.parameters()):
        sa, sb = o_fast.state[a], o_slow.state[b]
        assert sa["step"] == sb["step"]
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
    assert o_fast.state[list(fast.parameters())[1]]["step"] == 9  # 10 steps, skipped once


def test_parameters_upcast_after_construction_are_refused_at_the_first_step():
    # what Accelerate's FSDP prepare does with mixed_precision != "no" (param.data = fp32 copy)
    m = _model()
    opt = F.FlashAdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.data = p.data.float()
    m(torch.randn(4, 32)).pow(2).mean().backward()
    with pytest.raises(RuntimeError,
                       match=r"built on 4 torch.bfloat16 parameters, but 4 of them are float32 at the first step"):
        opt.step()
    # an optimizer built on fp32 parameters, and one whose parameters kept their dtype, step
    m32 = _model(dtype=torch.float32)
    _train(m32, F.FlashAdamW(m32.parameters(), lr=1e-3), steps=1, dtype=torch.float32)
    mb = _model()
    _train(mb, F.FlashAdamW(mb.parameters(), lr=1e-3), steps=2)
    # an engine that swaps in flat partitions of its own (DeepSpeed ZeRO with fp32 partitions):
    # other shapes, no upcast
    mz = _model()
    opt = F.FlashAdamW(mz.parameters(), lr=1e-3)
    flat = nn.Parameter(torch.cat([p.detach().float().reshape(-1) for p in mz.parameters()]))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn_like(flat)
    opt.step()
    assert opt.state[flat]["step"] == 1
