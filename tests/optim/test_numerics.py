"""The reference numerics against the paper's bounds (docs/design.md §2)."""

import math

import pytest
import torch

from flashoptim_dist import numerics as nx
from tolerances import TOLERANCES as TOL


def _ulp_bf16(p: torch.Tensor) -> torch.Tensor:
    """ULP of bf16 values (exact in fp64), subnormal spacing for zero/subnormal values."""
    pf = p.double().abs()
    e = torch.floor(torch.log2(torch.where(pf > 0, pf, 1.0)))
    e = torch.where(pf > 0, e, torch.full_like(e, -126.0)).clamp(min=-126)
    return torch.pow(2.0, e - 7)


def _rho_spacing_bf16(p: torch.Tensor) -> torch.Tensor:
    """The spacing ρ counts in (×2): the bf16 ULP, with the exponent floored at ρ's minimum
    (numerics._RHO_EMIN: below 2^-100 the correction resolves 2^-108/N absolute)."""
    return torch.maximum(_ulp_bf16(p), torch.tensor(2.0 ** (nx._RHO_EMIN[torch.bfloat16] - 7), dtype=torch.float64))


def _fp32_half_ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.double().abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, 1.0))).clamp(min=-126)
    return torch.pow(2.0, e - 24)


def _random_span(n, lo=-60, hi=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    exp = torch.randint(lo, hi, (n,), generator=g).double()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mant * torch.pow(2.0, exp)).float()


@pytest.mark.parametrize("rho_dtype,levels", [(torch.int8, 127), (torch.int16, 32767)])
def test_ecc_bound_random_values_spanning_2_pow_pm60(rho_dtype, levels):
    theta = _random_span(200_000)
    p, rho = nx.split_master(theta, torch.bfloat16, rho_dtype)
    assert p.dtype == torch.bfloat16 and rho.dtype == rho_dtype
    rec = nx.merge_master(p, rho)
    err = (rec.double() - theta.double()).abs()
    bound = _rho_spacing_bf16(p) / (4 * levels) + TOL["ecc_extra_fp32_ulps"] * 2 * _fp32_half_ulp(theta)
    assert bool((err <= bound).all()), float((err / bound).max())
    # the correction is real: without ρ the error is up to u/2, hundreds of times larger
    plain = (p.double() - theta.double()).abs()
    assert float(plain.max() / _ulp_bf16(p).max()) > 0.0
    assert float(err.mean()) < float(plain.mean()) / 50


@pytest.mark.parametrize("rho_dtype,levels", [(torch.int8, 127), (torch.int16, 32767)])
def test_ecc_bound_every_bf16_mantissa(rho_dtype, levels):
    # every bf16 mantissa (128) in a few binades, with 64 fp32 offsets inside each bf16 interval
    bits = torch.arange(0, 128, dtype=torch.int32)
    exps = torch.tensor([-130, -126, -101, -100, -99, -20, -1, 0, 1, 30, 120], dtype=torch.int32)
    base = []
    for e in exps.tolist():
        biased = max(e + 127, 0)
        base.append(((biased << 7) | bits).to(torch.int16))
    base = torch.cat(base).view(torch.bfloat16).float()
    offs = torch.arange(-32, 32, dtype=torch.int32) * 1024  # fp32 bit offsets below one bf16 ULP
    theta = (base.view(torch.int32)[:, None] + offs[None, :]).view(torch.float32).reshape(-1)
    theta = theta[torch.isfinite(theta)]
    p, rho = nx.split_master(theta, torch.bfloat16, rho_dtype)
    rec = nx.merge_master(p, rho)
    err = (rec.double() - theta.double()).abs()
    bound = _rho_spacing_bf16(p) / (4 * levels) + TOL["ecc_extra_fp32_ulps"] * 2 * _fp32_half_ulp(theta)
    assert bool((err <= bound).all())


def test_ecc_exact_when_representable():
    vals = torch.randn(10_000).bfloat16().float()
    vals = torch.cat([vals, torch.tensor([0.0, -0.0, 1e-40, 3.0e38])]).bfloat16().float()
    for rho_dtype in (torch.int8, torch.int16):
        p, rho = nx.split_master(vals, torch.bfloat16, rho_dtype)
        assert bool((rho == 0).all())
        assert torch.equal(nx.merge_master(p, rho), vals)


def test_ecc_fp16_bound_and_subnormals():
    theta = torch.cat([torch.randn(50_000) * 10, torch.randn(1000) * 1e-6])  # incl. fp16 subnormals
    p, rho = nx.split_master(theta, torch.float16, torch.int8)
    rec = nx.merge_master(p, rho)
    pf = p.double().abs()
    e = torch.floor(torch.log2(torch.where(pf > 0, pf, 1.0))).clamp(min=-14)
    e = torch.where(pf > 0, e, torch.full_like(e, -14.0))
    ulp = torch.pow(2.0, e - 10)
    err = (rec.double() - theta.double()).abs()
    assert bool((err <= ulp / (4 * 127) + _fp32_half_ulp(theta)).all())


def test_ecc_non_finite_is_defined():
    theta = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, 1.0])
    p, rho = nx.split_master(theta, torch.bfloat16, torch.int8)
    assert rho[:3].tolist() == [0, 0, 0]
    rec = nx.merge_master(p, rho)
    assert rec[0] == float("inf") and rec[1] == -float("inf") and torch.isnan(rec[2])
    # fp16 overflow: θ' = inf, ρ = 0, reconstruction inf (not NaN)
    p16, r16 = nx.split_master(torch.tensor([1e6]), torch.float16, torch.int8)
    assert torch.isinf(p16).all() and int(r16[0]) == 0
    assert torch.isinf(nx.merge_master(p16, r16)).all()


def _bit_patterns(n, seed=0):
    """Random fp32 bit patterns over the whole finite range (subnormals, ±0 and both signs)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = b.view(torch.float32)
    extra = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.3895e38, -3.4e38, 1.0, -1.0, 0.75])
    x = torch.cat([x[torch.isfinite(x)], extra])
    return x


def test_bf16_int16_split_holds_the_fp32_master_exactly():
    """bf16 + int16 ρ is the fp32 master itself (bit split, format version 3): every finite
    pattern comes back bit for bit, ±inf too; θ' is within half a bf16 ULP of θ."""
    x = torch.cat([_bit_patterns(200_000), torch.tensor([float("inf"), -float("inf")])])
    p, rho = nx.split_master(x, torch.bfloat16, torch.int16)
    assert torch.equal(nx.merge_master(p, rho).view(torch.int32), x.view(torch.int32))
    fin = torch.isfinite(p.float())
    gap = (p.float().double() - x.double()).abs()[fin]
    assert bool((gap <= _ulp_bf16(p)[fin] / 2).all())


def test_bf16_int8_split_is_the_24_bit_master_rounded():
    """bf16 + int8 ρ holds θ rounded to its top 24 bits (sign, exponent, 15 mantissa bits): to
    nearest (ties away from zero) without dither; the 24-bit value with dither k is ⌊b + k⌋ on
    the 2^8 grid of the bit pattern b. θ' is the nearest bf16 of that 24-bit value."""
    x = _bit_patterns(200_000, seed=1)
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    p, rho = nx.split_master(x, torch.bfloat16, torch.int8)
    rec = nx.merge_master(p, rho).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(rec, (b + 0x80) & ~0xFF)
    k = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(2))
    p, rho = nx.split_master(x, torch.bfloat16, torch.int8, k)
    rec = nx.merge_master(p, rho)
    assert torch.equal(rec.view(torch.int32).to(torch.int64) & 0xFFFFFFFF, (b + k) & ~0xFF)
    fin = torch.isfinite(p.float())
    gap = (p.float().double() - rec.double()).abs()[fin]
    assert bool((gap <= _ulp_bf16(p)[fin] / 2).all())
    assert int(rho.min()) >= -128 and int(rho.max()) <= 127


def test_bf16_split_of_nan_payloads_and_overflow():
    """The GPU's NaN is 0x7FFFFFFF (and negative NaNs exist): adding the rounding offset must not
    carry it into the sign bit — every NaN splits to bf16 NaN with ρ = 0."""
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001, -0x800000 + 1], dtype=torch.int32).view(torch.float32)
    for rho_dtype in (torch.int8, torch.int16):
        p, rho = nx.split_master(nans, torch.bfloat16, rho_dtype)
        assert bool(torch.isnan(p.float()).all()) and bool((rho == 0).all())
        assert bool(torch.isnan(nx.merge_master(p, rho)).all())


def _linear_rho(theta: torch.Tensor, n_levels: int = 127):
    """The bf16 split of format versions ≤ 2 (the paper's linear ρ), as those versions wrote it:
    θ' = RNE(θ), ρ = round((θ − θ')/(u/2)·N) (ckpt_common.linear_rho)."""
    import ckpt_common as C

    p = theta.bfloat16()
    return p, C.linear_rho(p, theta, n_levels)


@pytest.mark.parametrize("rho_dtype,levels", [(torch.int8, 127), (torch.int16, 32767)])
def test_rho_from_linear_keeps_the_old_master(rho_dtype, levels):
    """State written before format version 3 (linear ρ) converts to the bit split without
    moving θ' and without losing the master: int16 within one fp32 ULP (exact unless ρ was
    ±N), int8 within half a 24-bit step (one step where ρ was ±127)."""
    theta = torch.cat([_random_span(100_000, -90, 90), torch.tensor([0.0, -0.0, 1e-39, -1e-39, 2.0, -0.5])])
    p, old = _linear_rho(theta, levels)
    master = nx.merge_master(p, old, linear=True)
    assert float((master.double() - theta.double()).abs().max()) > 0  # (the old form is lossy too)
    new = nx.rho_from_linear(p, old)
    rec = nx.merge_master(p, new)
    assert bool(torch.isfinite(rec).all())
    gap = (rec.view(torch.int32).to(torch.int64) - master.view(torch.int32).to(torch.int64)).abs()
    gap = torch.where(rec == master, 0, gap)  # (−0 and +0: the old −0 + 0·u is +0)
    same_side = torch.sign(rec) * torch.sign(master) >= 0
    if rho_dtype == torch.int16:
        assert bool((gap[same_side] <= 1).all())
    else:
        assert bool((gap[same_side] <= 0x100).all())
        assert float((gap[same_side] <= 0x80).float().mean()) > 0.99
    # a master on the other side of zero from θ' = ±0 becomes that zero; ρ never underflows it
    z = torch.tensor([0.0, -0.0]).bfloat16()
    back = nx.merge_master(z, nx.rho_from_linear(z, torch.tensor([-5, 7], dtype=rho_dtype)))
    assert bool(torch.isfinite(back).all()) and float(back.abs().max()) < 1e-38


def test_sqrt_code_reciprocal_rounds_toward_zero():
    """255/s is rounded toward zero for every positive finite bf16 scale s: r·(255/s) ≤ 255 for
    every r ≤ s (so the √v codes need no clamp at 255), and it is the largest such float."""
    s = (torch.arange(1, 0x7F80, dtype=torch.int32) << 16).view(torch.float32)
    r = nx._reciprocal(s, 255.0, toward_zero=True)
    assert bool((r.double() * s.double() <= 255.0).all())
    up = (r.view(torch.int32) + 1).view(torch.float32)
    assert bool(((up.double() * s.double() > 255.0) | torch.isinf(up)).all())
    near = nx._reciprocal(s, 255.0)
    assert bool((near.double() * s.double() > 255.0).any())  # round-to-nearest would exceed 255
    # every code stays in range without the final clamp: z = s·rz(255/s) ≤ 255 exactly
    z = s * r
    assert float(z.max()) <= 255.0


def test_sqrt_v_is_correctly_rounded_on_the_fast_path_range_and_v_below():
    """numerics.sqrt_v (Adam's √v): correctly rounded for v ∈ [2^-101, +inf], v itself below
    2^-101 and for NaN (the kernel's branch-free square root; SQRT_V_MIN)."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 0x7F800001, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    v = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 2.0**-101, 2.0**-101 * 0.999, float("nan")])])
    got = nx.sqrt_v(v)
    big = v >= nx.SQRT_V_MIN
    assert torch.equal(got[big], torch.sqrt(v[big].double()).float())
    small = ~big & ~torch.isnan(v)
    assert torch.equal(got[small].view(torch.int32), v[small].view(torch.int32))
    assert bool(torch.isnan(got[torch.isnan(v)]).all())


def test_split_rejects_wrong_dtypes():
    with pytest.raises(TypeError, match="float32 master"):
        nx.split_master(torch.zeros(3, dtype=torch.float64), torch.bfloat16, torch.int8)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        nx.split_master(torch.zeros(3), torch.float32, torch.int8)
    with pytest.raises(TypeError, match="int8 or int16"):
        nx.split_master(torch.zeros(3), torch.bfloat16, torch.int32)


# ------------------------------------------------------------------------------ companders


def _heavy_tailed(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t-like: normal / sqrt(chi2) gives outliers inside most groups
    z = torch.randn(n, generator=g)
    w = torch.rand(n, generator=g).clamp_min(1e-3)
    return z / w.sqrt() * 1e-3


def test_signed_compander_error_bound_and_beats_linear_on_heavy_tails():
    x = _heavy_tailed(32 * 4096)
    q, s = nx.quantize_signed(x)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.numel() == 4096
    assert int(q.abs().max()) <= 127
    xr = nx.dequantize_signed(q, s)
    err = (xr - x).abs().view(-1, 32)
    sf = s.float()[:, None]
    assert bool((err <= sf * TOL["signed_abs_err_of_scale"]).all())
    # scale never below the group absmax (rounded up), at most one bf16 ULP above
    amax = x.abs().view(-1, 32).amax(1)
    assert bool((s.float() >= amax).all()) and bool((s.float() <= amax * (1 + TOL["scale_rel"])).all())
    ql, sl = nx.quantize_linear_signed(x)
    lin_err = (nx.dequantize_linear_signed(ql, sl) - x).abs()
    # companding spends codes on small values: much better relative error on the typical element
    rel_c = ((xr - x).abs() / x.abs().clamp_min(1e-12)).median()
    rel_l = (lin_err / x.abs().clamp_min(1e-12)).median()
    assert float(rel_c) < 0.8 * float(rel_l)
    # and most on the small elements (|x| < absmax/20), where linear int8 has a handful of levels
    small = (x.abs().view(-1, 32) < amax[:, None] / 20).view(-1)
    err_c_small = (xr - x).abs()[small].mean()
    err_l_small = lin_err[small].mean()
    assert float(err_c_small) < 0.6 * float(err_l_small)


def test_sqrt_compander_error_bound():
    v = _heavy_tailed(32 * 2048).pow(2)
    q, s = nx.quantize_sqrt(v)
    assert q.dtype == torch.uint8
    vr = nx.dequantize_sqrt(q, s)
    err = (vr.sqrt() - v.sqrt()).abs().view(-1, 32)
    assert bool((err <= s.float()[:, None] * TOL["sqrt_abs_err_of_scale"]).all())


def test_all_zero_groups_stay_exactly_zero():
    x = torch.zeros(96)
    x[40] = 1.0  # one non-zero group in the middle
    q, s = nx.quantize_signed(x)
    xr = nx.dequantize_signed(q, s)
    assert s[0] == 0 and s[2] == 0
    assert torch.equal(xr[:32], torch.zeros(32)) and torch.equal(xr[64:], torch.zeros(32))
    qv, sv = nx.quantize_sqrt(x.abs())
    assert torch.equal(nx.dequantize_sqrt(qv, sv)[:32], torch.zeros(32))


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e-10, 1e-7, 1e-5, 1e-3])
def test_tiny_groups_keep_relative_precision(magnitude):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32 * 256, generator=g) * magnitude
    q, s = nx.quantize_signed(x)
    xr = nx.dequantize_signed(q, s)
    amax = x.abs().view(-1, 32).amax(1, keepdim=True)
    rel = ((xr - x).abs().view(-1, 32) / amax).max()
    assert float(rel) <= TOL["signed_abs_err_of_scale"] * (1 + TOL["scale_rel"])
    v = x * x
    qv, sv = nx.quantize_sqrt(v)
    rv = (nx.dequantize_sqrt(qv, sv).sqrt() - v.sqrt()).abs().view(-1, 32) / v.sqrt().view(-1, 32).amax(1, keepdim=True)
    if magnitude >= 1e-18:  # v = x² must itself be a normal fp32 number (x ≥ 1.1e-19)
        assert float(rv.max()) <= TOL["sqrt_abs_err_of_scale"] * (1 + TOL["scale_rel"])


def test_fp16_scales_would_fail_where_bf16_scales_do_not():
    """Why scales are bf16 (rounded up) and not fp16 as in the reference implementation."""
    x = torch.randn(32 * 64) * 1e-6
    amax = x.abs().view(-1, 32).amax(1)
    fp16_scale = amax.half().float()
    rel_fp16 = ((fp16_scale - amax).abs() / amax).max()
    bf16 = nx.ceil_to_bf16(amax).float()
    rel_bf16 = ((bf16 - amax).abs() / amax).max()
    assert float(rel_fp16) > 0.01  # fp16 is subnormal here: >1% scale error
    assert float(rel_bf16) <= TOL["scale_rel"]
    assert float(nx.ceil_to_bf16(torch.tensor([1e-35])).float()) > 0  # fp16 would flush to 0


def test_non_finite_values_do_not_touch_other_elements():
    x = torch.randn(64)
    x_bad = x.clone()
    x_bad[5] = float("nan")
    x_bad[6] = float("inf")
    q, s = nx.quantize_signed(x_bad)
    q_ref, s_ref = nx.quantize_signed(torch.where(torch.isfinite(x_bad), x_bad, 0.0))
    assert torch.equal(q, q_ref) and torch.equal(s.view(torch.int16), s_ref.view(torch.int16))
    assert q[5] == 0 and q[6] == 0
    assert torch.equal(s[1:].view(torch.int16), nx.quantize_signed(x)[1][1:].view(torch.int16))


def test_phase_places_groups_canonically():
    """A run starting at phase p quantizes exactly like the canonical groups it lies in."""
    x = torch.randn(200)
    q_full, s_full = nx.quantize_signed(x)
    # a slice that starts and ends on group boundaries reproduces the canonical codes and scales
    q_mid, s_mid = nx.quantize_signed(x[64:160], phase=0)
    assert torch.equal(q_mid, q_full[64:160]) and torch.equal(s_mid.view(torch.int16), s_full[2:5].view(torch.int16))
    # a slice starting mid-group: its first partial group gets its own scale, later groups match
    q_off, s_off = nx.quantize_signed(x[70:160], phase=70 % 32)
    assert s_off.numel() == 3
    assert torch.equal(q_off[26:], q_full[96:160])
    assert torch.equal(nx.dequantize_signed(q_off, s_off, phase=6)[26:], nx.dequantize_signed(q_full, s_full)[96:160])


def test_ceil_to_bf16_is_upper_bound_and_saturates():
    x = torch.tensor([0.0, 1.0, 1.0 + 2**-10, 3.3e38, 1e-40, 7.0])
    c = nx.ceil_to_bf16(x).float()
    assert bool((c >= torch.where(x > 3.39e38, torch.zeros_like(x), x)).all())
    assert c[0] == 0 and c[1] == 1.0 and c[2] == 1.0 + 2**-7
    assert math.isfinite(float(c[3]))


# ----------------------------------------------------------------------------------------------
# stochastic rounding (issue 13): unbiased, keyed by canonical coordinates, in range


def _words(n, draw, seed=0):
    """Dither words of ``n`` elements at step ``draw`` (independent draws across steps)."""
    key = nx.parameter_key(seed, n)
    return nx.dither_words(torch.arange(n), nx.segment_salt(key, draw))


def test_stochastic_rho_is_unbiased_and_within_one_step():
    """E[θ̂] = θ: the mean of K draws of the master split lands within sr_mean_sigmas·σ/√K of the
    exact value (σ ≤ half a ρ step), where round-to-nearest is off by up to half a step."""
    g = torch.Generator().manual_seed(1)
    n, k = 4096, 400
    p = (torch.randn(n, generator=g) * 4).bfloat16()
    # masters strictly between bf16 neighbours, at fractions of a ρ step that nearest rounding loses
    step = torch.ldexp(torch.ones(n), nx.half_ulp_exponent(p.float(), torch.bfloat16)).double() / 127
    master = (p.double() + step * (torch.rand(n, generator=g, dtype=torch.float64) * 40 - 20)).float()
    acc = torch.zeros(n, dtype=torch.float64)
    for d in range(k):
        q, rho = nx.split_master(master, torch.bfloat16, torch.int8, nx.dither_field(_words(n, d), "rho"))
        back = nx.merge_master(q, rho).double()
        assert bool(((back - master.double()).abs() <= step * 1.0001).all())  # one of the two neighbours
        acc += back
    err = (acc / k - master.double()).abs() / step
    assert float(err.max()) <= TOL["sr_mean_sigmas"] * 0.5 / math.sqrt(k) + 2.0**-15
    q, rho = nx.split_master(master, torch.bfloat16, torch.int8)
    assert float(((nx.merge_master(q, rho).double() - master.double()).abs() / step).max()) > 0.45  # nearest


def test_stochastic_codes_are_unbiased_in_m_and_in_v():
    """Signed codes: E[m̂] = m. √v codes: E[v̂] = v — unbiased in v itself, which the EMA sums,
    not in √v (rounding √v's code up with probability frac(z) would give E[v̂] = v + Var)."""
    g = torch.Generator().manual_seed(2)
    n, k = 32 * 64, 300
    m = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    v = (torch.rand(n, generator=g) ** 6) * 1e-4
    acc_m = torch.zeros(n, dtype=torch.float64)
    acc_v = torch.zeros(n, dtype=torch.float64)
    for d in range(k):
        w = _words(n, d)
        qm, sm = nx.quantize_signed(m, 32, 0, nx.dither_field(w, "m"))
        acc_m += nx.dequantize_signed(qm, sm).double()
        qv, sv = nx.quantize_sqrt(v, 32, 0, nx.dither_field(w, "v"))
        acc_v += nx.dequantize_sqrt(qv, sv).double()
    # per element, σ of one draw ≤ half the spacing of the two neighbouring decoded values
    s_m = sm.double().repeat_interleave(32) * (2 / 127)  # largest signed code spacing, x-units
    y = torch.sqrt(v.double()) / sv.double().repeat_interleave(32) * 255
    s_v = (sv.double().repeat_interleave(32) / 255) ** 2 * (2 * torch.floor(y) + 1)  # v spacing there
    bound = TOL["sr_mean_sigmas"] * 0.5 / math.sqrt(k)
    assert float(((acc_m / k - m.double()).abs() / s_m).max()) <= bound + 2.0**-8
    err_v = (acc_v / k - v.double()) / s_v
    assert float(err_v.abs().max()) <= bound + 2.0**-16
    # rounding √v's code up with probability frac(z) would add f(1−f)/(2lo+1) of a spacing to
    # every draw — most on the small codes, where the v-domain rounding adds none
    acc_cd = torch.zeros(n, dtype=torch.float64)
    for d in range(k):
        u = nx.dither_field(_words(n, d), "v").double() / 65536
        q = torch.floor(torch.clamp(y + u, max=255))
        acc_cd += (q * sv.double().repeat_interleave(32) / 255) ** 2
    small = y < 4
    err_cd = ((acc_cd / k - v.double()) / s_v)[small]
    assert float(err_cd.mean()) > 0.04 and abs(float(err_v[small].mean())) < 0.01, (
        float(err_cd.mean()), float(err_v[small].mean()))


def test_stochastic_codes_never_leave_their_range():
    """|y| ≤ 127 + 2^-16 for every x ≤ 1 + 2^-22 (the largest x = m·fl(1/s) reaches), which the
    2^-8 grid rounds onto ±127: no int8 code wraps to -128, with any dither; √v codes stay ≤ 255
    although z = √v·fl(255/s) can exceed 255 by 2^-15."""
    x = torch.cat([torch.linspace(0.999, 1.0 + 2.0**-22, 100_001), torch.tensor([1.0 + 2.0**-22, 1.0 + 2.0**-23])])
    x = torch.cat([x, -x])
    for k in (0, 1, 127, 128, 255):
        q, _ = nx.quantize_signed(x * 0.75, 32, 0, torch.full_like(x, k, dtype=torch.int64))
        assert int(q.min()) >= -127 and int(q.max()) <= 127
    # the compander quotient the encoder rounds, at its largest input
    y = (x * 254.0) / (1.0 + x.abs())
    assert float(y.abs().max()) <= 127 + 2.0**-16
    assert float(((y + 49152.0) - 49152.0).abs().max()) == 127.0
    # √v: every element at the group max with the largest dither
    s = torch.tensor([1.0, 3.0, 1e-30, 7.7e20]).repeat_interleave(32)
    q, _ = nx.quantize_sqrt(s * s * (1 + 2.0**-23), 32, 0, torch.full((128,), 65535, dtype=torch.int64))
    assert int(q.max()) == 255


def test_dither_is_a_function_of_canonical_coordinates():
    """The same (seed, parameter size, step, global index) gives the same word wherever the
    element sits — a shard's words are a slice of the whole tensor's — and any change of
    seed, step or size changes them."""
    n = 1000
    key = nx.parameter_key(7, n)
    whole = nx.dither_words(torch.arange(n), nx.segment_salt(key, 5))
    part = nx.dither_words(torch.arange(300, 700), nx.segment_salt(key, 5))
    assert torch.equal(part, whole[300:700])
    for other in (nx.segment_salt(key, 6), nx.segment_salt(nx.parameter_key(8, n), 5),
                  nx.segment_salt(nx.parameter_key(7, n + 1), 5)):
        assert float((nx.dither_words(torch.arange(n), other) == whole).float().mean()) < 0.01
    # the fields of one element across steps are uniform and mutually uncorrelated
    w = torch.stack([nx.dither_words(torch.tensor([123]), nx.segment_salt(key, t)) for t in range(4000)]).reshape(-1)
    fields = {f: nx.dither_field(w, f).double() / 2 ** nx._FIELDS[f][1] for f in ("m", "v", "rho")}
    for f, u in fields.items():
        assert abs(float(u.mean()) - 0.5) < 0.03, f  # σ = 0.29/√4000 = 0.0046
    assert abs(float(torch.corrcoef(torch.stack([fields["m"], fields["v"]]))[0, 1])) < 0.06


def test_decoders_keep_the_meaning_of_the_codes():
    """The decoders' one-rounding forms (q/(254 − |q|)·s; (q·fl(s/255))²) stay within a few fp32
    ULPs of the companders' defining formulas (y/(2 − |y|)·s at y = q/127; ((q/255)·s)², in
    float64), for every code, so codes written before 2026-12-04 keep their meaning."""
    codes = torch.arange(-127, 128, dtype=torch.int8)
    for s in (1.0, 3.0e-7, 2.5e4):
        scales = torch.full((1,), s).bfloat16()
        sf = float(scales.float())
        x = nx.dequantize_signed(codes, scales, group_size=255)
        y = codes.double() / 127
        ideal = y / (2 - y.abs()) * sf
        assert float(((x.double() - ideal).abs() / ideal.abs().clamp_min(1e-300)).max()) <= 3 * 2.0**-24
        v = nx.dequantize_sqrt(codes.view(torch.uint8), scales, group_size=255)
        ideal_v = (codes.view(torch.uint8).double() / 255 * sf) ** 2
        assert float(((v.double() - ideal_v).abs() / ideal_v.clamp_min(1e-300)).max()) <= 6 * 2.0**-24
