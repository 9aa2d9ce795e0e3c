"""Flash optimizer state through torch's own state-dict APIs (issue 14), on gloo CPU ranks.

What a trainer that never calls flashoptim_dist.checkpoint does: ``get_state_dict`` +
``dcp.save``, then ``get_state_dict`` (template) + ``dcp.load`` + ``set_state_dict``; or
``full_state_dict=True`` gathered to rank 0 and loaded with ``broadcast_from_rank0=True``; or
``flatten_optimizer_state_dict=True``; FSDP1's ``FSDP.optim_state_dict`` /
``optim_state_dict_to_load``; a plain ``torch.save(opt.state_dict())``.

Oracles (independent of the code under test):

* the uninterrupted run's next step, written by ``flashoptim_dist.checkpoint.save`` (its own
  writer) — every parameter whose shards cut no quantization group must match bit for bit;
* the ``flashoptim_dist.checkpoint`` route on the same loading ranks (``ck.load`` of the
  checkpoint saved at the same moment, next step, ``ck.save``) — *every* tensor must match,
  cut groups included: both routes land partial groups canonically;
* the canonical values of the checkpoint saved at the same moment, read with plain DCP
  (``dcp_to_torch_save``): the torch-route files hold exactly those values, scales in the
  documented row layout.

The model (ckpt_common's, plus three parameters): ``odd`` has 7 rows (blocks 4+3 on 2 ranks,
3+3+1 on 3), ``bias2`` 2 rows (an empty rank on 3 ranks), and ``cut`` (row length 40) and
``vec`` (100 elements) have shard boundaries inside quantization groups on 2 and 3 ranks.
"""

from __future__ import annotations

import copy
import io
import os
import types

import pytest
import torch
from torch import nn

import ckpt_common as C
from dist_utils import run_distributed

K = C.STEPS_BEFORE
G = 32
CUT_PARAMS = ("cut", "vec")  # their dim-0 shards cut groups on 2 and 3 ranks


class Net(C.Net):
    def __init__(self):
        super().__init__()
        self.odd = nn.Parameter(torch.randn(7, C.D) * 0.5)
        self.cut = nn.Parameter(torch.randn(5, 40) * 0.5)
        self.vec = nn.Parameter(torch.randn(100) * 0.5)


def make_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().to(torch.bfloat16)


def wrap(engine: str, model: nn.Module, world: int):
    if engine == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import flashoptim_dist.distributed  # noqa: F401

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    return C.wrap(engine, model, world)


_NO_SCHED = types.SimpleNamespace(step=lambda: None)


def next_step(module, opt) -> None:
    """Step K + 1 as the uninterrupted run takes it (lr comes from the loaded param groups)."""
    C.train_steps(module, opt, _NO_SCHED, [K + 1])


def _is_cut_key(key: str) -> bool:
    return any(key == f"model.{n}" or key.startswith(f"flash.{n}.") for n in CUT_PARAMS)


# ------------------------------------------------------------------------------ save runs


def _save_run(rank, world, engine, root, tag, extra_options):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    import flashoptim_dist.checkpoint as ck

    model = make_net(0)
    wrapped, module = wrap(engine, model, world)
    opt = C.make_opt(module)
    sched = C.make_sched(opt)
    C.train_steps(module, opt, sched, range(1, K + 1))
    msd, osd = get_state_dict(module, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, f"dcp_{tag}"))
    ck.save(os.path.join(root, f"k_{tag}"), wrapped, opt, step=K)
    if extra_options:
        fm, fo = get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": fm, "optim": fo}, os.path.join(root, f"full_{tag}.pt"))
        fm, fo = get_state_dict(module, opt,
                                options=StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True))
        dcp.save({"model": fm, "optim": fo}, checkpoint_id=os.path.join(root, f"flat_{tag}"))
    C.train_steps(module, opt, sched, [K + 1])
    ck.save(os.path.join(root, f"k1_{tag}"), wrapped, opt, step=K + 1)


# ------------------------------------------------------------------------------ load runs


def _torch_route_load(module, opt, root, src, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    if src.startswith("full_"):
        # set_state_dict would skip the model on ranks > 0 (empty dict: "optimizer only"), so
        # model and optimizer separately, as torchtitan does
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sd = torch.load(os.path.join(root, src), weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(module, sd["model"], options=opts)
        set_optimizer_state_dict(module, opt, sd["optim"], options=opts)
        return
    opts = StateDictOptions(flatten_optimizer_state_dict=src.startswith("flat_"))
    msd, osd = get_state_dict(module, opt, options=opts)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=os.path.join(root, src))
    set_state_dict(module, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)


def _load_cases(rank, world, engine, root, cases):
    """For each (tag, torch-route source, flashoptim_dist.checkpoint twin): load through torch's
    APIs, take step K+1, write it with ck.save; then the same through ck.load."""
    import flashoptim_dist.checkpoint as ck

    out = {}
    for tag, src, twin in cases:
        model = make_net(1)  # another init: the load must overwrite everything
        wrapped, module = wrap(engine, model, world)
        opt = C.make_opt(module, lr=0.5)  # another lr: the param groups must be loaded too
        _torch_route_load(module, opt, root, src, rank)
        out[tag] = opt.param_groups[0]["lr"]
        next_step(module, opt)
        ck.save(os.path.join(root, f"t_{tag}"), wrapped, opt, step=K + 1)

        model = make_net(1)
        wrapped, module = wrap(engine, model, world)
        opt = C.make_opt(module, lr=0.5)
        ck.load(os.path.join(root, twin), wrapped, opt)
        next_step(module, opt)
        ck.save(os.path.join(root, f"f_{tag}"), wrapped, opt, step=K + 1)
    return out


def _one_rank_run(rank, world, root, cases):
    """On one rank: the 2 → 1 loads (FSDP2 on a 1-rank mesh and a plain model), then the
    1-rank saves that the 3-rank run loads."""
    res = {}
    for engine in ("fsdp2", "single"):
        res.update(_load_cases(rank, world, engine, root, [c for c in cases if c[0].endswith(engine)]))
    _save_run(rank, world, "fsdp2", root, "fsdp2_1", False)
    _save_run(rank, world, "single", root, "single_1", False)
    return res


# ------------------------------------------------------------------------------ layout oracle


def _row_layout_matches(rows: torch.Tensor, flat: torch.Tensor, shape) -> None:
    """``rows[r, j]`` is the scale of the j-th canonical group touching row r; zero padding."""
    R = shape[0] if len(shape) else 1
    numel = int(torch.Size(shape).numel())
    L = numel // R if R else 0
    assert rows.dim() == 2 and rows.shape[0] == R, (tuple(rows.shape), shape)
    for r in range(R):
        a, c = (r * L) // G, ((r * L) % G + L - 1) // G + 1
        assert torch.equal(C.bits(rows[r, :c]), C.bits(flat.reshape(-1)[a : a + c])), f"row {r} of {shape}"
        assert not rows[r, c:].any(), f"padding of row {r} of {shape} is not zero"


def _optim_state_of(sd: dict) -> dict:
    """fqn -> state dict, from a nested ("state") or flattened ("state.<fqn>.<name>") dict."""
    o = sd["optim"]
    if "state" in o:
        return o["state"]
    out: dict = {}
    for k, v in o.items():
        if k.startswith("state."):
            fqn, name = k[len("state."):].rsplit(".", 1)
            out.setdefault(fqn, {})[name] = v
    return out


def check_torch_files_are_canonical(torch_sd: dict, canon: dict, model_shapes: dict) -> int:
    """The optimizer state in a torch-route checkpoint equals the canonical checkpoint saved at
    the same moment: ρ and codes shaped like the parameter, scales in the row layout."""
    n = 0
    state = _optim_state_of(torch_sd)
    assert set(state) == set(model_shapes), sorted(set(state) ^ set(model_shapes))
    for fqn, shape in model_shapes.items():
        st = state[fqn]
        assert int(st["step"]) == K, (fqn, st["step"])
        for name in ("rho", "exp_avg", "exp_avg_sq"):
            got, want = st[name], canon[f"flash.{fqn}.{name}"]
            assert tuple(got.shape) == tuple(shape) and got.dtype == want.dtype, (fqn, name, got.shape, got.dtype)
            assert torch.equal(C.bits(got), C.bits(want)), f"{fqn} {name} differs from the canonical checkpoint"
            n += got.numel()
        for name in ("exp_avg", "exp_avg_sq"):
            _row_layout_matches(st[name + "_scales"], canon[f"flash.{fqn}.{name}.scales"], shape)
            n += st[name + "_scales"].numel()
    return n


def assert_next_steps_agree(root: str, tags, ref_name: str) -> dict:
    """For each tag, the step after loading through torch's APIs (``t_<tag>``) equals the step
    after ``flashoptim_dist.checkpoint.load`` (``f_<tag>``) in every tensor, and the uninterrupted
    run's (``ref_name``) wherever no group was cut. Returns the reference's tensors."""
    ref = C.canonical_tensors(os.path.join(root, ref_name))
    for tag in tags:
        t = C.canonical_tensors(os.path.join(root, f"t_{tag}"))
        f = C.canonical_tensors(os.path.join(root, f"f_{tag}"))
        bad = C.diff_canonical(t, f)
        assert not bad, (
            f"{tag}: next step after the torch route differs from the flashoptim_dist.checkpoint route: {bad[:6]}"
        )
        bad = [k for k in C.diff_canonical(t, ref) if not _is_cut_key(k)]
        assert not bad, f"{tag}: next step differs from the uninterrupted run {ref_name}: {bad[:6]}"
    return ref


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """FSDP2 on 2 ranks (sharded, full, flattened) and HSDP 2×2 (4 ranks), saved after K steps."""
    root = str(tmp_path_factory.mktemp("torch_sd"))
    run_distributed(_save_run, 2, "fsdp2", root, "fsdp2_2", True)
    run_distributed(_save_run, 4, "hsdp", root, "hsdp_4", False, timeout=300)
    return root


def test_torch_route_files_hold_the_canonical_state(saved):
    """What DCP wrote through get_state_dict (sharded, HSDP, flattened) and what the full state
    dict holds is the canonical state: codes and ρ with the parameter's global shape, scales in
    the documented row layout, cut groups agreed like flashoptim_dist.checkpoint."""
    root = saved
    shapes = {C.clean(n): tuple(p.shape) for n, p in make_net(0).named_parameters()}
    canon = C.canonical_tensors(os.path.join(root, "k_fsdp2_2"))
    assert not C.diff_canonical(canon, C.canonical_tensors(os.path.join(root, "k_hsdp_4")))
    for src in ("dcp_fsdp2_2", "dcp_hsdp_4", "flat_fsdp2_2"):
        assert check_torch_files_are_canonical(C.read_checkpoint(os.path.join(root, src)), canon, shapes) > 0, src
    full = torch.load(os.path.join(root, "full_fsdp2_2.pt"), weights_only=True)
    assert check_torch_files_are_canonical(full, canon, shapes) > 0
    assert all(type(v).__name__ != "DTensor" for st in full["optim"]["state"].values() for v in st.values())


def test_fsdp2_reshards_through_get_set_state_dict_and_dcp(saved):
    """2 → 2 (sharded, full_state_dict + broadcast_from_rank0, flatten_optimizer_state_dict),
    HSDP 2×2 → 2, 2 → 1 (FSDP2 and a plain model), 1 → 3 (FSDP2 and a plain model as source):
    the next step equals the uninterrupted run bit for bit wherever no group was cut, and the
    flashoptim_dist.checkpoint route everywhere."""
    root = saved
    two = [("fsdp2_2", "dcp_fsdp2_2", "k_fsdp2_2"), ("full_2", "full_fsdp2_2.pt", "k_fsdp2_2"),
           ("flat_2", "flat_fsdp2_2", "k_fsdp2_2"), ("hsdp_2", "dcp_hsdp_4", "k_hsdp_4")]
    one = [("to1_fsdp2", "dcp_fsdp2_2", "k_fsdp2_2"), ("to1_single", "dcp_fsdp2_2", "k_fsdp2_2")]
    three = [("from1_fsdp2", "dcp_fsdp2_1", "k_fsdp2_1"), ("from1_single", "dcp_single_1", "k_single_1"),
             ("full_3", "full_fsdp2_2.pt", "k_fsdp2_2")]
    lrs = run_distributed(_load_cases, 2, "fsdp2", root, two)
    lrs += run_distributed(_one_rank_run, 1, root, one)
    lrs += run_distributed(_load_cases, 3, "fsdp2", root, three)
    assert all(lr == pytest.approx(1e-2 / (1 + K)) for r in lrs for lr in r.values()), lrs
    assert_next_steps_agree(root, [tag for tag, _, _ in two + one + three], "k1_fsdp2_2")


def test_standard_dcp_checkpoint_with_flash_state_is_recognised(saved, capsys):
    """`ckpt inspect` says what a get_state_dict/dcp.save checkpoint holds; ck.load refuses it
    naming the route that loads it (it would otherwise read 8-bit codes as torch moments)."""
    import flashoptim_dist.checkpoint as ck
    from flashoptim_dist.checkpoint import cli

    path = os.path.join(saved, "dcp_fsdp2_2")
    info = ck.inspect_checkpoint(path)
    fl = info["flash_state"]
    assert info["kind"] == "torch" and fl["params"] == len(list(make_net(0).parameters()))
    assert fl["state_names"] == ["exp_avg", "exp_avg_scales", "exp_avg_sq", "exp_avg_sq_scales", "rho"]
    assert fl["rho_dtype"] == "int8" and fl["scales_layout"] == "rows"
    assert info["tensor_bytes"]["rho"] > 0 and info["tensor_bytes"]["scales"] > 0
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "Flash optimizer state" in text and "set_state_dict" in text
    with pytest.raises(ck.CheckpointError, match="set_state_dict"):
        ck.load(path, *C.fresh(0), convert=True)


# ------------------------------------------------------------------------------ FSDP1


def _fsdp1_run(rank, world, root):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    import flashoptim_dist.checkpoint as ck

    # offload_to_cpu=False: on a CPU-only machine FSDP1's ".cpu()" of each gathered state is a
    # no-op, so with the default (True) every state name aliases the one buffer FSDP1 reuses
    # for its all-gathers (torch 2.13; plain torch.optim.AdamW state comes out wrong the same way)
    types_ = {
        "full": (StateDictType.FULL_STATE_DICT, FullStateDictConfig(), FullOptimStateDictConfig(offload_to_cpu=False)),
        "sharded": (StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(),
                    ShardedOptimStateDictConfig(offload_to_cpu=False)),
    }
    model = make_net(0)
    w, _ = wrap("fsdp1", model, world)
    opt = C.make_opt(w)
    sched = C.make_sched(opt)
    C.train_steps(w, opt, sched, range(1, K + 1))
    saved = {}
    for kind, cfg in types_.items():
        with FSDP.state_dict_type(w, *cfg):
            saved[kind] = (copy.deepcopy(w.state_dict()), FSDP.optim_state_dict(w, opt))
    saved["dsd"] = (copy.deepcopy(get_model_state_dict(w)), get_optimizer_state_dict(w, opt))  # the buffer aliases
    C.train_steps(w, opt, sched, [K + 1])
    ck.save(os.path.join(root, "fsdp1_ref"), w, opt, step=K + 1)
    for kind, (msd, osd) in saved.items():
        model = make_net(1)
        w2, _ = wrap("fsdp1", model, world)
        opt2 = C.make_opt(w2, lr=0.5)
        if kind == "dsd":
            set_state_dict(w2, opt2, model_state_dict=msd, optim_state_dict=osd)
        else:
            with FSDP.state_dict_type(w2, *types_[kind]):
                w2.load_state_dict(msd)
                opt2.load_state_dict(FSDP.optim_state_dict_to_load(w2, opt2, osd))
        next_step(w2, opt2)
        ck.save(os.path.join(root, f"fsdp1_{kind}"), w2, opt2, step=K + 1)

    # use_orig_params=False: the optimizer holds the FlatParameters (flashoptim_dist.checkpoint
    # refuses those, so the two runs are compared tensor by tensor)
    runs = []
    msd3 = osd3 = None  # saved by the first pass (resume=False), loaded by the second
    for resume in (False, True):
        model = make_net(1 if resume else 0)
        w3 = _fsdp1_flat(model)
        opt3 = C.make_opt(w3, lr=0.5 if resume else 1e-2)
        if resume:
            with FSDP.state_dict_type(w3, *types_["full"]):
                w3.load_state_dict(msd3)
                opt3.load_state_dict(FSDP.optim_state_dict_to_load(w3, opt3, osd3))
        else:
            C.train_steps(w3, opt3, C.make_sched(opt3), range(1, K + 1))
            with FSDP.state_dict_type(w3, *types_["full"]):
                msd3, osd3 = copy.deepcopy(w3.state_dict()), FSDP.optim_state_dict(w3, opt3)
        next_step(w3, opt3)
        runs.append([(p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt3.state[p].items()})
                     for p in w3.parameters()])
    return all(_bits_equal(a, b) and set(sa) == set(sb) and all(
        _bits_equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)
        for (a, sa), (b, sb) in zip(*runs))


def _fsdp1_flat(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from flashoptim_dist.distributed import prepare_fsdp1

    w = FSDP(model, use_orig_params=False, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({C.Block}))
    prepare_fsdp1(w)
    return w


def test_fsdp1_optim_state_dict_round_trip_and_continue(tmp_path):
    """FSDP1 (use_orig_params=True): FSDP.optim_state_dict / optim_state_dict_to_load with the
    full and the sharded state-dict types, and get/set_optimizer_state_dict, then one more step:
    bit-identical to the uninterrupted run (cut groups included: same sharding). The same with
    use_orig_params=False (FlatParameters in the optimizer), full type."""
    root = str(tmp_path)
    flat_ok = run_distributed(_fsdp1_run, 2, root)
    assert all(flat_ok), "FSDP1 use_orig_params=False: the resumed step differs from the uninterrupted one"
    ref = C.canonical_tensors(os.path.join(root, "fsdp1_ref"))
    for kind in ("full", "sharded", "dsd"):
        bad = C.diff_canonical(ref, C.canonical_tensors(os.path.join(root, f"fsdp1_{kind}")))
        assert not bad, f"FSDP1 {kind}: next step differs from the uninterrupted run: {bad[:6]}"


# ------------------------------------------------------------------------------ one process


def _one_process_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(6, 64).bfloat16())  # row length a multiple of G: scales are a view
    m.c = nn.Parameter(torch.randn(5, 40).bfloat16())  # groups span rows
    m.v = nn.Parameter(torch.randn(100).bfloat16())  # 1-D: one scale row per element
    m.e = nn.Parameter(torch.zeros(0, 8).bfloat16())  # empty
    m.f = nn.Parameter(torch.randn(3, 33))  # fp32: no ρ
    m.s = nn.Parameter(torch.tensor(0.7).bfloat16())  # 0-d: one row of one element
    return m


def _grads(m, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in m.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)


def _bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(C.bits(a), C.bits(b))


@pytest.mark.parametrize("cls,kw", [("FlashAdamW", {}), ("FlashSGD", {"momentum": 0.9}), ("FlashLion", {})])
def test_plain_torch_save_round_trip_in_one_process(cls, kw):
    """torch.save(opt.state_dict()) / torch.load(weights_only=True) / load_state_dict in one
    process: the state has the documented global layout and continues bit for bit."""
    import flashoptim_dist as fo

    m = _one_process_model()
    opt = getattr(fo, cls)(m.parameters(), lr=1e-3, **kw)
    for t in range(3):
        _grads(m, t)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for i, p in enumerate(m.parameters()):
        st = sd["state"][i]
        if "rho" in st:
            assert tuple(st["rho"].shape) == tuple(p.shape)
        for name in [k for k in st if k.endswith("_scales")]:
            R = p.shape[0] if p.dim() else 1
            assert st[name].dim() == 2 and st[name].shape[0] == R, (name, tuple(st[name].shape))
            assert tuple(st[name[: -len("_scales")]].shape) == tuple(p.shape)
    m2 = copy.deepcopy(_one_process_model(seed=1))
    with torch.no_grad():
        for a, b in zip(m2.parameters(), m.parameters()):
            a.copy_(b)
    opt2 = getattr(fo, cls)(m2.parameters(), lr=0.5, **kw)
    opt2.load_state_dict(sd)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert set(opt.state[p]) == set(opt2.state[p2])
        for k, v in opt.state[p].items():
            assert _bits_equal(v, opt2.state[p2][k]) if torch.is_tensor(v) else v == opt2.state[p2][k], k
    for t in range(3, 5):
        _grads(m, t)
        opt.step()
        _grads(m2, t)
        opt2.step()
    assert all(_bits_equal(a.detach(), b.detach()) for a, b in zip(m.parameters(), m2.parameters()))


def test_torch_empty_optimizer_initialisation_changes_nothing():
    """torch's _init_optim_state (zero grads, lr = 0, one step) — what get_state_dict and
    set_state_dict run on an optimizer without state — leaves every parameter bit-identical and
    creates state for every parameter, also with check_numerics, with gradient release on, and
    through the Triton kernel (interpreted on CPU)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    import flashoptim_dist as fo

    cases = [("FlashAdamW", dict(weight_decay=0.1, check_numerics=True)), ("FlashAdam", dict(weight_decay=0.1)),
             ("FlashSGD", dict(momentum=0.9, weight_decay=0.1)), ("FlashSGDW", dict(momentum=0.9, weight_decay=0.1)),
             ("FlashLion", dict(weight_decay=0.1)), ("FlashAdamW", dict(master_weight_bits=32, quantize=False))]
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it on machines without CUDA
        cases += [(cls, dict(kw, backend="triton")) for cls, kw in (cases[0], cases[2], cases[4])]
    for cls, kw in cases:
        for release in (False, True) if "backend" not in kw else (False,):  # the interpreter is slow
            m = _one_process_model()
            m.e = None  # gradient release hooks need parameters with elements
            before = [p.detach().clone() for p in m.parameters()]
            opt = getattr(fo, cls)(m.parameters(), lr=1e-2, **kw)
            if release:
                fo.enable_gradient_release(m, opt)
            _init_optim_state(opt)
            assert all(_bits_equal(a, b.detach()) for a, b in zip(before, m.parameters())), (cls, kw, release)
            assert all(p.grad is None for p in m.parameters())
            assert opt.param_groups[0]["lr"] == 1e-2
            assert all("step" in opt.state[p] for p in m.parameters()), (cls, kw)


def test_framework_constructor_flags_are_accepted():
    """torchtitan passes fused/foreach to every optimizer: accepted and ignored (the Flash step
    is always one fused launch), same update; capturable/differentiable False are accepted."""
    import flashoptim_dist as fo

    for cls in ("FlashAdamW", "FlashSGD", "FlashLion"):
        for kw in (dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False),
                   dict(fused=None, foreach=None, capturable=False, differentiable=False)):
            ms = [_one_process_model() for _ in range(2)]
            opts = [getattr(fo, cls)(ms[0].parameters(), lr=1e-2), getattr(fo, cls)(ms[1].parameters(), lr=1e-2, **kw)]
            for m, o in zip(ms, opts):
                _grads(m, 0)
                o.step()
            assert all(_bits_equal(a.detach(), b.detach())
                       for a, b in zip(ms[0].parameters(), ms[1].parameters())), (cls, kw)


@pytest.mark.parametrize("kw,match", [(dict(capturable=True, check_numerics=True),
                                       "capturable=True with check_numerics"),
                                      (dict(differentiable=True), "differentiable=True.*not differentiable")])
def test_framework_constructor_flags_that_cannot_be_honoured_are_refused(kw, match):
    import flashoptim_dist as fo

    for cls in ("FlashAdamW", "FlashSGD", "FlashLion"):
        with pytest.raises(ValueError, match=match):
            getattr(fo, cls)(_one_process_model().parameters(), **kw)


def test_elementwise_form_reconciles_groups_cut_by_the_saving_shards():
    """FSDP1's per-element form written by two shards whose boundary cuts a group, loaded on one
    shard holding both sides (what FSDP1 gives a different world size): the group takes the
    larger side's scale, the other side's codes are re-expressed against it (within half a code
    step of it), everything else is exact."""
    import flashoptim_dist as fo
    import flashoptim_dist.numerics as nx
    from flashoptim_dist import layout as lay
    from tolerances import TOLERANCES as TOL

    n, cut = 100, 45  # the boundary cuts group 1 = [32, 64)
    torch.manual_seed(0)
    full = (torch.randn(n) * 0.5).bfloat16()

    def shard(lo, hi):
        p = nn.Parameter(full[lo:hi].clone())
        lay.set_shard_spec(p, lay.ShardSpec(global_shape=(n,), segments=(lay.Segment(0, hi - lo, lo, None, n),),
                                            state_dict_form=lay.FORM_ELEMENTWISE))
        return p

    pa, pb, pw = shard(0, cut), shard(cut, n), shard(0, n)
    oa, ob = fo.FlashAdamW([pa], lr=1e-2), fo.FlashAdamW([pb], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = (torch.randn(n, generator=g) * torch.linspace(0.1, 3.0, n)).bfloat16()  # sides differ in scale
        pa.grad, pb.grad = grad[:cut].clone(), grad[cut:].clone()
        oa.step()
        ob.step()
    sa, sb = oa.state_dict()["state"][0], ob.state_dict()["state"][0]
    assert sa["exp_avg_scales"].numel() == cut and sa["rho"].dtype == torch.bfloat16  # one value per element
    merged = {k: torch.cat([v, sb[k]]) if torch.is_tensor(v) else v for k, v in sa.items()}  # FSDP1's gather
    ow = fo.FlashAdamW([pw], lr=0.5)
    ow.load_state_dict({"state": {0: merged}, "param_groups": oa.state_dict()["param_groups"]})
    A, B, W = oa.state[pa], ob.state[pb], ow.state[pw]
    assert W["step"] == 3 and torch.equal(W["rho"], torch.cat([A["rho"], B["rho"]]))
    n_requant = 0
    for name, kind in (("exp_avg", "signed"), ("exp_avg_sq", "sqrt")):
        sA, sB, sW = A[name + "_scales"], B[name + "_scales"], W[name + "_scales"]
        agreed = max(float(sA[1]), float(sB[0]))
        assert sW.tolist() == [float(sA[0]), agreed, float(sB[1]), float(sB[2])], name
        codes = torch.cat([A[name], B[name]])
        assert torch.equal(W[name][:32], codes[:32]) and torch.equal(W[name][64:], codes[64:]), name
        deq = nx.dequantize_signed if kind == "signed" else nx.dequantize_sqrt
        tol = TOL["signed_abs_err_of_scale" if kind == "signed" else "sqrt_abs_err_of_scale"] * agreed
        for lo, hi, s_side in ((32, cut, sA[1:2]), (cut, 64, sB[0:1])):
            old = deq(codes[lo:hi], s_side, G, lo % G)
            new = deq(W[name][lo:hi], sW[1:2], G, lo % G)
            if float(s_side) == agreed:
                assert torch.equal(W[name][lo:hi], codes[lo:hi]), name
                continue
            n_requant += 1
            diff = (new - old).abs() if kind == "signed" else (new.sqrt() - old.sqrt()).abs()
            assert float(diff.max()) <= tol, (name, float(diff.max()), tol)
    assert n_requant == 2, "each state must have had a side with the smaller scale for this test to mean anything"
