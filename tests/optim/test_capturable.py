"""capturable=True (issue 18, item 3): step counters and lr as device tensors, hyper rows computed
on the device, no host read inside step(), so a CUDA graph can capture opt.step().

On CPU: the same bits as the host path (lr as a Python float), no host sync in the optimizer's
part of the step, checkpoints in both directions. The capture/replay test needs a GPU.
"""

import io
import math
import os
import time

import numpy as np
import pytest
import torch

import flashoptim_dist as F

CASES = [
    ("FlashAdamW", {}),
    ("FlashAdamW", {"master_weight_bits": 32}),
    ("FlashSGD", {"momentum": 0.9, "nesterov": True}),
    ("FlashLion", {"weight_decay": 0.1}),
]


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(40, 33), torch.nn.Linear(33, 7)).to(torch.bfloat16)
    return m.to(device)


def _grads(m, step, device="cpu"):
    g = torch.Generator().manual_seed(1000 + step)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=p.dtype)


def _train(capturable, cls, kw, steps=20, backend="reference"):
    """``steps`` steps under a cosine-like LambdaLR; lr a float64 tensor when capturable (so the
    scheduler writes it in place with the same values as the float path)."""
    m = _model()
    lr = torch.tensor(1e-2, dtype=torch.float64) if capturable else 1e-2
    opt = getattr(F, cls)(m.parameters(), lr=lr, backend=backend, capturable=capturable, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for s in range(steps):
        _grads(m, s)
        opt.step()
        sched.step()
    return m, opt


def _assert_same(ma, oa, mb, ob):
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if k == "step":
                assert float(sa[k]) == float(sb[k])
            else:
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls,kw", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_capturable_tensor_lr_gives_the_bits_of_the_host_path(cls, kw):
    ma, oa = _train(False, cls, kw)
    mb, ob = _train(True, cls, kw)
    _assert_same(ma, oa, mb, ob)
    st = ob.state[next(mb.parameters())]["step"]
    assert torch.is_tensor(st) and st.dtype == torch.float32 and st.shape == () and float(st) == 20
    assert torch.is_tensor(ob.param_groups[0]["lr"])  # the scheduler wrote the tensor in place


def test_capturable_through_the_kernel_matches_the_host_path():
    """One AdamW case through the Triton kernel (interpreted on CPU): same bits both ways."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    ma, oa = _train(False, "FlashAdamW", {}, steps=3, backend="triton")
    mb, ob = _train(True, "FlashAdamW", {}, steps=3, backend="triton")
    _assert_same(ma, oa, mb, ob)


@pytest.mark.parametrize("cls,kw", [("FlashAdamW", {}), ("FlashAdamW", {"betas": (0.95, 0.9999)}),
                                    ("FlashAdam", {"betas": (0.0, 0.99)}), ("FlashSGD", {"momentum": 0.9}),
                                    ("FlashLion", {})])
def test_device_hyper_rows_round_to_the_host_rows(cls, kw):
    """The fp32 rows the kernel reads, host (numpy fp64) vs device (torch fp64) formulation, over
    steps 1..200000. fp64 pow/expm1 of numpy and torch differ in the last bit on a few percent of
    steps; after the rounding to fp32 they must agree (a difference needs an fp64 value within an
    ulp of an fp32 rounding midpoint)."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = getattr(F, cls)([p], lr=3e-4, backend="reference", **kw)
    group = opt.param_groups[0]
    steps = np.arange(1, 200_001, dtype=np.float64)
    host = opt._hyper_rows(group, steps).astype(np.float32)
    dev = opt._hyper_rows_t(group, torch.from_numpy(steps)).to(torch.float32).numpy()
    host[:, 10:], dev[:, 10:] = 0, 0  # the step columns are filled by the caller
    assert np.array_equal(host.view(np.int32), dev.view(np.int32))
    group["lr"] = torch.tensor(3e-4, dtype=torch.float64)
    dev_t = opt._hyper_rows_t(group, torch.from_numpy(steps)).to(torch.float32).numpy()
    dev_t[:, 10:] = 0
    assert np.array_equal(host.view(np.int32), dev_t.view(np.int32))


_HOST_READS = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                                           "numpy", "__array__")]


class _HostRead(AssertionError):
    pass


def _step_without_host_reads(opt):
    """``opt.step()`` with every Tensor→host accessor raising. The math backend's call is let
    through: on a GPU it is the kernel launch, which reads nothing; on CPU it is the reference,
    the spec, which reads its fp32 rows as Python floats. Everything else is checked. Returns
    the hyper rows the backend was given."""
    from flashoptim_dist.optim import _plan

    def boom(*a, **k):
        raise _HostRead("host read inside step()")

    own = {(o, n): o.__dict__.get(n) for o, n in _HOST_READS}  # None: inherited from TensorBase

    def patch():
        for o, n in own:
            setattr(o, n, boom)

    def restore():
        for (o, n), f in own.items():
            if f is None:
                if n in o.__dict__:
                    delattr(o, n)
            else:
                setattr(o, n, f)

    real_ref = _plan.reference_step
    seen = []

    def backend(family, decoupled, batch, hyper, *rest):
        seen.append(hyper)
        restore()
        try:
            return real_ref(family, decoupled, batch, hyper, *rest)
        finally:
            patch()

    _plan.reference_step = backend
    patch()
    try:
        opt.step()
    finally:
        restore()
        _plan.reference_step = real_ref
    return seen


@pytest.mark.parametrize("cls,kw", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_capturable_step_reads_nothing_on_the_host(cls, kw):
    m = _model()
    opt = getattr(F, cls)(m.parameters(), lr=torch.tensor(1e-2), backend="reference", capturable=True, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    _grads(m, 0)
    opt.step()  # warm-up: allocates state (and on a GPU compiles the kernel, builds its plan)
    sched.step()
    for s in range(1, 4):  # the steady path, then the general path (a parameter without gradient)
        _grads(m, s)
        if s == 3:
            m[1].bias.grad = None
        seen = _step_without_host_reads(opt)
        assert seen and all(torch.is_tensor(h) and h.dtype == torch.float32 for h in seen)
        sched.step()
    assert float(opt.state[m[0].weight]["step"]) == 4 and float(opt.state[m[1].bias]["step"]) == 3


def test_the_host_read_check_fails_on_the_default_path():
    """The same check fails without capturable: the host path reads a tensor lr on the host (with
    a float lr it reads no tensor at all, but builds its rows in numpy and copies them)."""
    m = _model()
    opt = F.FlashAdamW(m.parameters(), lr=torch.tensor(1e-2), backend="reference")
    _grads(m, 0)
    opt.step()
    _grads(m, 1)
    with pytest.raises(_HostRead):
        _step_without_host_reads(opt)


def test_capturable_refuses_check_numerics():
    with pytest.raises(ValueError, match="capturable=True with check_numerics=True"):
        F.FlashAdamW(_model().parameters(), capturable=True, check_numerics=True)


def test_capturable_with_gradient_release_matches_the_host_path():
    """Gradient release steps each parameter in its backward hook (not captured): same bits."""
    out = []
    for cap in (False, True):
        m = _model()
        opt = F.FlashAdamW(m.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64) if cap else 1e-2,
                           backend="reference", capturable=cap)
        handle = F.enable_gradient_release(m, opt)
        x = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        for _ in range(4):
            m(x).float().pow(2).mean().backward()
        handle.remove()
        out.append((m, opt))
    _assert_same(*out[0], *out[1])


@pytest.mark.parametrize("src_cap,dst_cap", [(True, True), (False, True), (True, False)])
def test_checkpoint_round_trip_between_capturable_and_not(src_cap, dst_cap):
    ma, oa = _train(src_cap, "FlashAdamW", {}, steps=5)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)  # a real checkpoint: state_dict() holds views of the live state
    buf.seek(0)
    sd = torch.load(buf)
    step = sd["state"][0]["step"]
    if src_cap:  # saved as torch saves capturable steps: a 0-d float32 tensor
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.shape == ()
    mb = _model()
    with torch.no_grad():
        for a, b in zip(ma.parameters(), mb.parameters()):
            b.copy_(a)
    lr = torch.tensor(0.0, dtype=torch.float64) if dst_cap else 0.0
    ob = F.FlashAdamW(mb.parameters(), lr=lr, backend="reference", capturable=dst_cap)
    ob.load_state_dict(sd)
    _assert_same(ma, oa, mb, ob)
    st = ob.state[next(mb.parameters())]["step"]
    assert torch.is_tensor(st) if dst_cap else isinstance(st, int)
    # both continue identically (lr restored from the saved param group)
    ob.param_groups[0]["lr"] = torch.tensor(1e-3, dtype=torch.float64) if dst_cap else 1e-3
    oa.param_groups[0]["lr"] = torch.tensor(1e-3, dtype=torch.float64) if src_cap else 1e-3
    for s in range(2):
        _grads(ma, 50 + s)
        _grads(mb, 50 + s)
        oa.step()
        ob.step()
    _assert_same(ma, oa, mb, ob)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls,kw", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_cuda_graph_replay_matches_eager_steps(cls, kw):
    """Capture opt.step() in a CUDA graph, replay it N times (lr changed in place between
    replays), and compare with N eager steps bit for bit; prints the host time per replay."""
    n = 10
    dev = "cuda"
    models, opts = [], []
    for cap in (False, True):
        m = _model(device=dev)
        lr = torch.tensor(1e-2, dtype=torch.float64, device=dev) if cap else 1e-2
        opts.append(getattr(F, cls)(m.parameters(), lr=lr, capturable=cap, **kw))
        models.append(m)
    lrs = [1e-2 * 0.9 ** s for s in range(n + 1)]
    # step 0: eager on both (the warm-up: state, kernel compile, plan), gradients stay allocated
    for m, o in zip(models, opts):
        _grads(m, 0, dev)
        o.step()
    me, oe = models[0], opts[0]
    mc, oc = models[1], opts[1]
    static = [p.grad for p in mc.parameters()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            oc.step()
    torch.cuda.current_stream().wait_stream(s)
    # the capture did not step: the replays do
    host = []
    for step in range(1, n + 1):
        _grads(me, step, dev)
        oe.param_groups[0]["lr"] = lrs[step]
        oe.step()
        g = torch.Generator().manual_seed(1000 + step)
        for p, sg in zip(mc.parameters(), static):
            sg.copy_(torch.randn(p.shape, generator=g).to(dtype=p.dtype))
        oc.param_groups[0]["lr"].fill_(lrs[step])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    for a, b in zip(me.parameters(), mc.parameters()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for k in oe.state[a]:
            if k != "step":
                assert torch.equal(oe.state[a][k], oc.state[b][k]), k
        assert float(oc.state[b]["step"]) == n + 1
    print(f"{cls} {kw}: host time per replay {1e6 * sorted(host)[len(host) // 2]:.1f} us (median)")


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_training_step_graph_breaks_at_the_optimizer(capturable):
    """torch.compile of a whole training step (forward, backward, opt.step(), zero_grad): dynamo
    breaks the graph at the Flash step (kept out of dynamo by ``torch._disable_dynamo``), which runs eagerly — the
    same bits as the uncompiled step. Before the step was excluded, dynamo failed inside the
    launch planner (InternalTorchDynamoError)."""
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)

    def run(compiled):
        m = _model()
        lr = torch.tensor(1e-3, dtype=torch.float64) if capturable else 1e-3
        opt = F.FlashAdamW(m.parameters(), lr=lr, capturable=capturable, backend="reference")

        def train_step():
            loss = m(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        losses = [float(fn()) for _ in range(3)]
        return losses, [p.detach().clone() for p in m.parameters()], opt

    torch._dynamo.reset()
    (le, pe, oe), (lc, pc, oc) = run(False), run(True)
    assert le == lc
    for a, b in zip(pe, pc):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for a, b in zip(oe.state.values(), oc.state.values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
