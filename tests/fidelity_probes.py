"""Fidelity probes: regimes where re-quantizing 8-bit state every step can stall, measured
against fp32 ``torch.optim`` on the same gradients.

Each probe returns plain numbers (ratios of a Flash optimizer's behaviour to torch's; 1.0 is
perfect). ``tests/optim/test_fidelity.py`` asserts them with bounds from ``tests/tolerances.py``;
``python tests/fidelity_probes.py`` prints the table in docs/QUALITY.md for both rounding modes.

The probes (issue 13):

* ``v_decay``: gradients c_i for 100 steps then 0.01·c_i (c_i ∈ [0.5, 1.5]); at β2 = 0.999 the
  second moment must decay by 0.05% per step in √v, below half a code. Ratio of the weights'
  displacement over steps 100..T, and of the dequantized v of each group's largest element at T.
* ``idle``: element 0 of every group keeps its gradient, the others stop after 100 steps; the
  momentum of the stopped ones must decay to 0. Ratio of their movement over steps 100..T.
* ``sub_resolution``: lr 1e-6 on weights near 1 (RMSNorm gains), where one step moves a 24-bit
  master by 0.03 of ρ's resolution. Ratio of the drift over T steps, to exact (float64) AdamW
  and to fp32 torch.
* ``spike``: one element's gradient ×10^4 for one step in groups of iid N(0,1) gradients; the
  other 31 elements' √v then sits below code 1 of a scale set by the spike (√(1−β2)·10^4 = 316
  times theirs at β2 = 0.999). Ratio of their mean |step| over the following T steps, and the
  largest single-step |Δθ|/lr anywhere (less one ρ step, the rounding of the new master).
* ``sgd_idle`` / ``lion_idle``: the momentum-buffer analogue of ``idle`` for FlashSGD (movement
  ratio) and FlashLion (ratio of the mean dequantized momentum of the stopped elements, while
  torch's is at least 8 codes of the group scale; Lion's step is a sign, so movement does not
  measure the momentum).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

import flashoptim_dist as F

G = 32


def _pair(n, init, torch_cls, flash_cls, kw, flash_kw):
    """fp32 params under torch's optimizer and bf16 params under the Flash one, same values."""
    ref = torch.nn.Parameter(init.clone().float())
    fl = torch.nn.Parameter(init.clone().bfloat16())
    return ref, fl, torch_cls([ref], **kw), flash_cls([fl], **kw, **flash_kw)


def _run(ref, fl, t_opt, f_opt, grad_of: Callable[[int], torch.Tensor], steps: int, on_step=None):
    for t in range(steps):
        g = grad_of(t)
        ref.grad = g.clone()
        fl.grad = g.bfloat16()
        t_opt.step()
        f_opt.step()
        if on_step is not None:
            on_step(t)


def rho_unit(p: torch.Tensor) -> torch.Tensor:
    """One step of ρ at each element of a bf16 param: (u/2)/127. Stochastic rounding puts the
    master on either neighbour, so a measured step can exceed the update by this much."""
    pf = p.detach().float().reshape(-1)
    return torch.ldexp(torch.ones_like(pf), F.numerics.half_ulp_exponent(pf, torch.bfloat16)) / 127


def _master(opt, p):
    return opt.master_params()[0].reshape(-1) if isinstance(opt, F.FlashOptimizer) else p.detach().reshape(-1)


def v_decay(beta2: float, steps: int = 1500, groups: int = 8, seed: int = 0, **flash_kw) -> Dict[str, float]:
    n = groups * G
    gen = torch.Generator().manual_seed(seed)
    c = 0.5 + torch.rand(n, generator=gen)
    init = torch.randn(n, generator=gen) * 0.1 + 1.0
    kw = dict(lr=1e-3, betas=(0.9, beta2), weight_decay=0.0)
    ref, fl, t_opt, f_opt = _pair(n, init, torch.optim.AdamW, F.FlashAdamW, kw, flash_kw)
    d_ref, d_fl = _movement_after(ref, fl, t_opt, f_opt, lambda t: c * (1.0 if t < 100 else 0.01), steps)
    v_ref = t_opt.state[ref]["exp_avg_sq"].reshape(groups, G)
    v_fl = f_opt.dequantized_state(fl)["exp_avg_sq"].reshape(groups, G)
    top = c.reshape(groups, G).argmax(dim=1, keepdim=True)
    v_ratio = (v_fl.gather(1, top) / v_ref.gather(1, top)).mean()
    return {"displacement_ratio": float(d_fl / d_ref), "v_top_ratio": float(v_ratio)}


def _movement_after(ref, fl, t_opt, f_opt, grad_of, steps, start=100, mask=None):
    """Σ|Δθ| of both runs from step ``start`` to the end (over ``mask`` when given)."""
    snap = {}

    def on_step(t):
        if t == start - 1:
            snap["ref"], snap["fl"] = ref.detach().clone(), _master(f_opt, fl).clone()

    _run(ref, fl, t_opt, f_opt, grad_of, steps, on_step)
    d_ref, d_fl = ref.detach() - snap["ref"], _master(f_opt, fl) - snap["fl"]
    if mask is not None:
        d_ref, d_fl = d_ref[mask], d_fl[mask]
    return d_ref.abs().sum(), d_fl.abs().sum()


def _idle_problem(groups, seed):
    """(gradients c, initial weights, the active mask: element 0 of every group) of the idle probes."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(groups * G, generator=gen)
    init = torch.randn(groups * G, generator=gen) * 0.1
    active = torch.zeros(groups * G, dtype=torch.bool)
    active[::G] = True
    return c, init, active


def _idle_movement(torch_cls, flash_cls, kw, steps, groups, seed, flash_kw) -> Dict[str, float]:
    """Element 0 of every group keeps its gradient, the others stop after step 100: the ratio of
    the stopped elements' movement from then on, Flash over torch."""
    n = groups * G
    c, init, active = _idle_problem(groups, seed)
    ref, fl, t_opt, f_opt = _pair(n, init, torch_cls, flash_cls, kw, flash_kw)
    d_ref, d_fl = _movement_after(ref, fl, t_opt, f_opt, lambda t: torch.where(active | (t < 100), c, 0.0), steps,
                                  mask=~active)
    return {"idle_movement_ratio": float(d_fl / d_ref)}


def idle(steps: int = 1000, groups: int = 8, seed: int = 0, **flash_kw) -> Dict[str, float]:
    return _idle_movement(torch.optim.AdamW, F.FlashAdamW, dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0),
                          steps, groups, seed, flash_kw)


def sub_resolution(steps: int = 500, n: int = 1024, seed: int = 0, **flash_kw) -> Dict[str, float]:
    """Also against exact arithmetic: torch AdamW on float64 params from Flash's start (the bf16
    values) with Flash's (bf16) gradients. fp32 torch itself is off here — every step adds ~1e-6
    to weights whose fp32 spacing is 6e-8 or 1.2e-7, and the rounding of that sum is the same
    each step — so ``drift_ratio_exact`` is the fidelity measure; ``drift_ratio`` (to fp32
    torch) and ``torch_fp32_vs_exact`` are reported beside it."""
    gen = torch.Generator().manual_seed(seed)
    init = 1.0 + torch.randn(n, generator=gen) * 0.01
    c = 1e-3 * (1.0 + 0.5 * torch.rand(n, generator=gen))  # same sign: Adam's step is ~lr
    kw = dict(lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0)
    ref, fl, t_opt, f_opt = _pair(n, init, torch.optim.AdamW, F.FlashAdamW, kw, flash_kw)
    exact = torch.nn.Parameter(fl.detach().double())
    e_opt = torch.optim.AdamW([exact], **kw)
    start_ref, start_fl = ref.detach().clone(), _master(f_opt, fl).clone()

    def exact_step(t):
        exact.grad = c.bfloat16().double()
        e_opt.step()

    _run(ref, fl, t_opt, f_opt, lambda t: c, steps, on_step=exact_step)
    d_ref = (ref.detach() - start_ref).sum()
    d_fl = (_master(f_opt, fl) - start_fl).sum()
    d_exact = (exact.detach() - start_fl.double()).sum()
    return {"drift_ratio": float(d_fl / d_ref), "drift_ratio_exact": float(d_fl.double() / d_exact),
            "torch_fp32_vs_exact": float(d_ref.double() / d_exact)}


def spike(beta2: float = 0.999, factor: float = 1e4, steps: int = 300, groups: int = 8, seed: int = 0,
          **flash_kw) -> Dict[str, float]:
    n = groups * G
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(n, generator=gen) * 0.1
    grads = torch.randn(steps + 50, n, generator=gen)
    spiked = torch.zeros(n, dtype=torch.bool)
    spiked[::G] = True
    lr = 1e-3
    kw = dict(lr=lr, betas=(0.9, beta2), weight_decay=0.0)
    ref, fl, t_opt, f_opt = _pair(n, init, torch.optim.AdamW, F.FlashAdamW, kw, flash_kw)
    prev = {}
    acc = {"ref": 0.0, "fl": 0.0, "max": 0.0}

    def grad(t):
        return torch.where(spiked & (t == 50), grads[t] * factor, grads[t])

    def on_step(t):
        now_ref, now_fl = ref.detach().clone(), _master(f_opt, fl).clone()
        if prev:
            d_fl = (now_fl - prev["fl"]).abs()
            acc["max"] = max(acc["max"], float((d_fl - rho_unit(fl)).max()) / lr)
            if t > 50:
                acc["ref"] += float((now_ref - prev["ref"]).abs()[~spiked].sum())
                acc["fl"] += float(d_fl[~spiked].sum())
        prev["ref"], prev["fl"] = now_ref, now_fl

    _run(ref, fl, t_opt, f_opt, grad, steps + 50, on_step)
    return {"others_step_ratio": acc["fl"] / acc["ref"], "max_step_over_lr": acc["max"]}


def sgd_idle(steps: int = 300, groups: int = 8, seed: int = 0, **flash_kw) -> Dict[str, float]:
    return _idle_movement(torch.optim.SGD, F.FlashSGD, dict(lr=1e-2, momentum=0.9), steps, groups, seed, flash_kw)


def lion_idle(steps: int = 300, groups: int = 8, seed: int = 0, **flash_kw) -> Dict[str, float]:
    n = groups * G
    c, init, active = _idle_problem(groups, seed)
    fl = torch.nn.Parameter(init.clone().bfloat16())
    f_opt = F.FlashLion([fl], lr=1e-4, betas=(0.9, 0.99), **flash_kw)
    m_ref = torch.zeros(n)  # fp32 Lion momentum (torch has no Lion; the rule is two lines)
    ratios = []
    for t in range(steps):
        g = torch.where(active | (t < 100), c, 0.0)
        fl.grad = g.bfloat16()
        f_opt.step()
        m_ref = 0.99 * m_ref + 0.01 * g.bfloat16().float()
        if t >= 100:
            m_fl = f_opt.dequantized_state(fl)["exp_avg"]
            scale = m_ref.abs().reshape(groups, G).amax(dim=1).repeat_interleave(G)
            ok = ~active & (m_ref.abs() >= 8 / 254 * scale)  # ≥ 8 codes: resolvable by torch's rule
            if ok.any():
                ratios.append(float(m_fl[ok].abs().sum() / m_ref[ok].abs().sum()))
    return {"idle_momentum_ratio": sum(ratios) / len(ratios)}


def gpt_update_trace(beta2: float, steps: int, seed: int = 0, preset_name: str = "tiny", windows: int = 2,
                     variants: Dict[str, dict] = None, seq: int = 64, batch: int = 8):
    """A real model's gradients: a small GPT (``preset_name``) on the bytes of this package's
    source, AdamW (fp32) trained as usual at lr 1e-3 (10% warm-up, then flat: the largest steps
    are the test), and one FlashAdamW per entry of ``variants`` (constructor keywords; bf16
    params) fed the *same* gradient each step, computed at AdamW's weights, so all see one
    gradient stream however far their weights drift. Per window of ``steps // windows`` steps
    and variant: the mean over steps of Σ|Δθ| of the Flash master over AdamW's (update size; 1.0
    is perfect) and of the cosine between the two updates (direction), weight matrices only."""
    import glob
    import os

    from flashoptim_dist.models.gpt import GPT, preset

    variants = {"default": {}} if variants is None else variants
    torch.manual_seed(seed)
    files = sorted(glob.glob(os.path.join(os.path.dirname(F.__file__), "**", "*.py"), recursive=True))
    data = torch.tensor(list(b"".join(open(f, "rb").read() for f in files)), dtype=torch.long)
    model = GPT(preset(preset_name, vocab_size=256))
    params = list(model.parameters())
    kw = dict(lr=1e-3, betas=(0.9, beta2), weight_decay=0.1)
    t_opt = torch.optim.AdamW(params, **kw)
    flash = {}
    for name, flash_kw in variants.items():
        fl = [torch.nn.Parameter(p.detach().clone().bfloat16()) for p in params]
        flash[name] = (fl, F.FlashAdamW(fl, **kw, **flash_kw))
    gen = torch.Generator().manual_seed(seed)
    per_window = max(1, steps // windows)
    out = {name: [[0.0, 0.0] for _ in range(windows)] for name in variants}
    for t in range(windows * per_window):
        lr = kw["lr"] * min(1.0, (t + 1) / max(1, steps // 10))
        for opt in [t_opt] + [o for _, o in flash.values()]:
            for group in opt.param_groups:
                group["lr"] = lr
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq] for i in start])
        y = torch.stack([data[i + 1:i + seq + 1] for i in start])
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        before_t = [p.detach().clone() for p in params]
        before_f = {name: [m.clone() for m in opt.master_params()] for name, (_, opt) in flash.items()}
        t_opt.step()
        d_t = [p.detach() - b for p, b in zip(params, before_t)]
        for name, (fl, opt) in flash.items():
            for p, q in zip(params, fl):
                q.grad = p.grad.bfloat16()
            opt.step()
            mats = [(dt, m - b) for dt, m, b in zip(d_t, opt.master_params(), before_f[name]) if dt.dim() == 2]
            size = sum(float(df.abs().sum()) for _, df in mats) / sum(float(dt.abs().sum()) for dt, _ in mats)
            dot = sum(float((dt * df).sum()) for dt, df in mats)
            norms = sum(float(dt.square().sum()) for dt, _ in mats) * sum(float(df.square().sum()) for _, df in mats)
            acc = out[name][t // per_window]
            acc[0] += size / per_window
            acc[1] += dot / norms ** 0.5 / per_window
    return out


def gpt_updates(beta2: float = 0.999, steps: int = 80, seed: int = 0, **flash_kw) -> Dict[str, float]:
    """:func:`gpt_update_trace` of the ``tiny`` GPT for one Flash configuration, second half of
    the run: ``update_size_ratio`` and ``update_cosine``."""
    size, cos = gpt_update_trace(beta2, steps, seed, variants={"flash": flash_kw})["flash"][-1]
    return {"update_size_ratio": size, "update_cosine": cos}


PROBES = {
    "v_decay β2=0.95": lambda **k: v_decay(0.95, **k),
    "v_decay β2=0.99": lambda **k: v_decay(0.99, **k),
    "v_decay β2=0.999": lambda **k: v_decay(0.999, **k),
    "idle (AdamW)": idle,
    "lr 1e-6 on weights near 1": sub_resolution,
    "spike ×10^4 (β2=0.999)": spike,
    "spike ×10^4 (β2=0.95)": lambda **k: spike(0.95, **k),
    "idle (SGD momentum 0.9)": sgd_idle,
    "idle (Lion β2=0.99)": lion_idle,
    "tiny GPT, same gradients (β2=0.999)": gpt_updates,
    "tiny GPT, same gradients (β2=0.95)": lambda **k: gpt_updates(0.95, **k),
}


def gpt_trace_main(preset_name: str, steps: int) -> None:
    """``python tests/fidelity_probes.py --gpt-trace mini 1000``: the same-gradient trace of
    :func:`gpt_update_trace` at both β2 for the defaults, nearest rounding, fp32 moments and a
    32-bit master, 8 windows (docs/QUALITY.md)."""
    variants = {"defaults": {}, "nearest": {"rounding": "nearest"}, "fp32 moments": {"quantize": False},
                "32-bit master": {"master_weight_bits": 32}}
    for beta2 in (0.999, 0.95):
        trace = gpt_update_trace(beta2, steps, preset_name=preset_name, windows=8, variants=variants)
        bounds = [f"{w * steps // 8 + 1}-{(w + 1) * steps // 8}" for w in range(8)]
        print(f"\n{preset_name} GPT, β2 = {beta2}: update size / cosine against AdamW, per window of steps")
        print("| variant | " + " | ".join(bounds) + " |")
        print("|---|" + "---|" * 8)
        for name, rows in trace.items():
            print(f"| {name} | " + " | ".join(f"{a:.4f} / {c:.4f}" for a, c in rows) + " |", flush=True)


def main() -> None:
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--gpt-trace":
        return gpt_trace_main(sys.argv[2], int(sys.argv[3]))
    modes = [("nearest", {"rounding": "nearest"}), ("stochastic", {"rounding": "stochastic"})]
    print("| probe | metric | " + " | ".join(f"{m} (seeds 0-2)" for m, _ in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for name, fn in PROBES.items():
        res = {m: [fn(seed=s, **kw) for s in range(3)] for m, kw in modes}
        for metric in res[modes[0][0]][0]:
            cells = []
            for m, _ in modes:
                vals = [r[metric] for r in res[m]]
                cells.append(" / ".join(f"{v:.3f}" for v in vals))
            print(f"| {name} | {metric} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
