"""Flash optimizers against torch.optim: exact math with quantization off, close with it on."""


import pytest
import torch

import flashoptim_dist as F
from tolerances import TOLERANCES as TOL


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (64,), (3, 5, 7), (1,)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _grads(step, shapes, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(s, generator=g) for s in shapes]


def _run(make_opt, init, steps, dtype, bf16_grads=False):
    ps = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
    opt = make_opt(ps)
    for i in range(steps):
        for p, gr in zip(ps, _grads(i, [p.shape for p in ps])):
            if bf16_grads:  # the same gradient values for a bf16 and a fp32 run
                gr = gr.bfloat16()
            p.grad = gr.to(dtype)
        opt.step()
    return ps, opt


def _rel(a, b):
    a = torch.cat([x.detach().float().reshape(-1) for x in a])
    b = torch.cat([x.detach().float().reshape(-1) for x in b])
    return float((a - b).norm() / b.norm())


CASES = [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
     lambda ps, **k: F.FlashAdamW(ps, lr=1e-2, weight_decay=0.1, **k)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
     lambda ps, **k: F.FlashAdam(ps, lr=1e-2, weight_decay=0.1, **k)),
    ("adam_max", lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True),
     lambda ps, **k: F.FlashAdam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True, **k)),
    ("sgd_plain", lambda ps: torch.optim.SGD(ps, lr=1e-2), lambda ps, **k: F.FlashSGD(ps, lr=1e-2, **k)),
    ("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
     lambda ps, **k: F.FlashSGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01, **k)),
    ("sgd_dampening", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.3),
     lambda ps, **k: F.FlashSGD(ps, lr=1e-2, momentum=0.9, dampening=0.3, **k)),
    ("sgd_nesterov", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, maximize=True),
     lambda ps, **k: F.FlashSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, maximize=True, **k)),
]


@pytest.mark.parametrize("name,torch_opt,flash_opt", CASES, ids=[c[0] for c in CASES])
def test_fp32_params_unquantized_match_torch(name, torch_opt, flash_opt):
    init = _params()
    ref, _ = _run(torch_opt, init, 50, torch.float32)
    got, _ = _run(lambda ps: flash_opt(ps, quantize=False, master_weight_bits=32), init, 50, torch.float32)
    assert _rel(got, ref) <= TOL["vs_torch_rel"]


@pytest.mark.parametrize("name,torch_opt,flash_opt", CASES[:2] + CASES[4:5], ids=["adamw", "adam", "sgd_momentum"])
def test_bf16_params_with_32bit_master_track_torch_fp32(name, torch_opt, flash_opt):
    init = [t.bfloat16().float() for t in _params()]  # start from values both can represent
    ref, _ = _run(torch_opt, init, 50, torch.float32, bf16_grads=True)
    got, opt = _run(lambda ps: flash_opt(ps, quantize=False, master_weight_bits=32), init, 50, torch.bfloat16,
                    bf16_grads=True)
    assert _rel(opt.master_params(), ref) <= TOL["vs_torch_rel_bf16_32bit"]
    # the bf16 params alone are much further from the trajectory: ρ carries real information
    assert _rel(got, ref) > 10 * _rel(opt.master_params(), ref)


def _lion_reference(params, grads_fn, steps, lr, betas, wd):
    """Lion in ten lines (Chen et al. 2023, Algorithm 2), in fp32 like the optimizer."""
    ps = [p.float().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for i in range(steps):
        for p, m, g in zip(ps, ms, grads_fn(i, [p.shape for p in ps])):
            g = g.float()
            p.mul_(1 - lr * wd)
            p.add_(torch.sign(betas[0] * m + (1 - betas[0]) * g), alpha=-lr)
            m.mul_(betas[1]).add_(g, alpha=1 - betas[1])
    return ps


def test_lion_unquantized_matches_ten_line_reference():
    init = _params()
    ref = _lion_reference(init, _grads, 50, 1e-3, (0.9, 0.99), 0.1)
    got, _ = _run(lambda ps: F.FlashLion(ps, lr=1e-3, weight_decay=0.1, quantize=False), init, 50, torch.float32)
    assert _rel(got, ref) <= TOL["vs_torch_rel"]


def test_sgdw_is_sgd_with_decoupled_decay():
    init = _params()
    got, _ = _run(lambda ps: F.FlashSGDW(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, quantize=False), init, 20,
                  torch.float32)
    # reference: torch SGD without decay, decaying θ by (1 - lr·wd) before each step
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.SGD(ps, lr=1e-2, momentum=0.9)
    for i in range(20):
        with torch.no_grad():
            for p in ps:
                p.mul_(1 - 1e-2 * 0.1)
        for p, gr in zip(ps, _grads(i, [p.shape for p in ps])):
            p.grad = gr
        opt.step()
    assert _rel(got, ps) <= TOL["vs_torch_rel"]


# The quantized-trajectory test (direction and size of the change, non-stationary gradients)
# is in tests/optim/test_fidelity.py with the other fidelity probes.
