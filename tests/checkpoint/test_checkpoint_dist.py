"""Checkpoints across engines and world sizes (gloo, CPU).

Saved on 4 ranks under FSDP2, loaded on 1, 2 and 3 ranks under FSDP2, on 2 ranks under FSDP1, on
one rank and in a plain process: after the load every local state element (param, ρ, codes,
scales) equals the checkpoint's canonical value at its global position, and the next step (same
full gradients) produces a checkpoint identical bit for bit to the one the uninterrupted 4-rank
run wrote after that step. Also: DDP round trip, groups cut by a save-time shard boundary
(canonical scale agreement), and a rank killed in the middle of a save.
"""

from __future__ import annotations

import os

import pytest
import torch

import ckpt_common as C
from dist_utils import run_distributed
from optional_deps import require_module

K = C.STEPS_BEFORE


def _train_save(rank, world, engine, root):
    import flashoptim_dist.checkpoint as ck

    model = C.make_net(0)
    wrapped, module = C.wrap(engine, model, world)
    opt = C.make_opt(module)
    sched = C.make_sched(opt)
    C.train_steps(module, opt, sched, range(1, K + 1))
    info = ck.save(os.path.join(root, "k"), wrapped, opt, lr_scheduler=sched, extra={"data_pos": 1234}, step=K)
    C.train_steps(module, opt, sched, [K + 1])
    ck.save(os.path.join(root, "k1_ref"), wrapped, opt, lr_scheduler=sched, step=K + 1)
    return info


def _load_continue(rank, world, engine, root, tag):
    import flashoptim_dist.checkpoint as ck

    model = C.make_net(1)  # other init: the load must overwrite everything
    wrapped, module = C.wrap(engine, model, world)
    opt = C.make_opt(module, lr=0.5)
    sched = C.make_sched(opt)
    res = ck.load(os.path.join(root, "k"), wrapped, opt, lr_scheduler=sched)
    canon = C.canonical_tensors(os.path.join(root, "k"))
    n = C.check_local_state_equals(canon, module, opt)
    assert torch.equal(module.seen, canon["model.seen"]), "buffer not restored"
    lr = opt.param_groups[0]["lr"]
    C.train_steps(module, opt, sched, [K + 1])
    ck.save(os.path.join(root, f"k1_{tag}"), wrapped, opt, lr_scheduler=sched, step=K + 1)
    loss = C.real_step(wrapped, opt, 0)
    return {"n": n, "extra": res["extra"], "lr": lr, "loss": loss, "saved_world": res["saved_world_size"],
            "step": res["step"]}


@pytest.fixture(scope="module")
def fsdp2_4rank(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2_4"))
    info = run_distributed(_train_save, 4, "fsdp2", root)[0]
    return root, info


@pytest.mark.parametrize("engine,world", [("fsdp2", 1), ("fsdp2", 2), ("fsdp2", 3), ("fsdp1", 2)])
def test_fsdp2_4_ranks_reshards(fsdp2_4rank, engine, world):
    root, info = fsdp2_4rank
    assert info["world_size"] == 4
    tag = f"{engine}{world}"
    res = run_distributed(_load_continue, world, engine, root, tag)
    for r in res:
        assert r["saved_world"] == 4 and r["step"] == K and r["extra"] == {"data_pos": 1234}
        assert r["lr"] == pytest.approx(1e-2 / (1 + K)), "param-group lr not restored from the checkpoint"
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert sum(r["n"] for r in res) > 0
    bad = C.diff_canonical(C.canonical_tensors(os.path.join(root, "k1_ref")),
                           C.canonical_tensors(os.path.join(root, f"k1_{tag}")))
    assert not bad, f"next step after loading on {world} {engine} rank(s) differs from the uninterrupted run: {bad[:6]}"


def test_fsdp2_4_ranks_loads_in_one_plain_process(fsdp2_4rank):
    import flashoptim_dist.checkpoint as ck

    root, _ = fsdp2_4rank
    model = C.make_net(1)
    opt = C.make_opt(model, lr=0.5)
    sched = C.make_sched(opt)
    ck.load(os.path.join(root, "k"), model, opt, lr_scheduler=sched)
    canon = C.canonical_tensors(os.path.join(root, "k"))
    # every element of param, ρ and both codes, and every scale of both states
    assert C.check_local_state_equals(canon, model, opt) == sum(4 * p.numel() + 2 * -(-p.numel() // 32)
                                                                for p in model.parameters())
    C.train_steps(model, opt, sched, [K + 1])
    ck.save(os.path.join(root, "k1_plain"), model, opt, lr_scheduler=sched, step=K + 1)
    bad = C.diff_canonical(C.canonical_tensors(os.path.join(root, "k1_ref")),
                           C.canonical_tensors(os.path.join(root, "k1_plain")))
    assert not bad, bad[:6]


# ------------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_2rank(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddp_2"))
    run_distributed(_train_save, 2, "ddp", root)
    return root


@pytest.mark.parametrize("engine,world", [("ddp", 2), ("single", 1)])
def test_ddp_round_trip(ddp_2rank, engine, world):
    root = ddp_2rank
    tag = f"{engine}{world}"
    res = run_distributed(_load_continue, world, engine, root, tag)
    assert all(r["saved_world"] == 2 and r["extra"] == {"data_pos": 1234} for r in res)
    bad = C.diff_canonical(C.canonical_tensors(os.path.join(root, "k1_ref")),
                           C.canonical_tensors(os.path.join(root, f"k1_{tag}")))
    assert not bad, bad[:6]


# ------------------------------------------------------------------ groups cut by a shard boundary

# Flat runs of each parameter per rank, boundaries deliberately inside groups (G = 32).
CUT_SHAPES = {"a": (7, 40), "b": (100,), "c": (3, 5, 11)}
CUT_SPLITS = {
    2: {"a": [0, 137, 280], "b": [0, 45, 100], "c": [0, 77, 165]},
    3: {"a": [0, 50, 201, 280], "b": [0, 10, 60, 100], "c": [0, 33, 34, 165]},
}


def _flat_model(rank, world, seed=0):
    from torch import nn

    from flashoptim_dist import layout as lay

    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    for name, shape in CUT_SHAPES.items():
        full = (torch.randn(shape, generator=g) * 0.5).to(torch.bfloat16)
        n = full.numel()
        if world == 1:
            m.register_parameter(name, nn.Parameter(full))
            continue
        lo, hi = CUT_SPLITS[world][name][rank], CUT_SPLITS[world][name][rank + 1]
        p = nn.Parameter(full.reshape(-1)[lo:hi].clone())
        lay.set_shard_spec(p, lay.ShardSpec(global_shape=shape, segments=(lay.Segment(0, hi - lo, lo, None, n),)))
        m.register_parameter(name, p)
    return m


def _cut_train_save(rank, world, root):
    import flashoptim_dist.checkpoint as ck

    m = _flat_model(rank, world)
    opt = C.make_opt(m)
    sched = C.make_sched(opt)
    for t in range(1, 4):
        C.set_grads(m, t)
        opt.step()
        sched.step()
    rec = {}
    for name, p in m.named_parameters():
        spec = __import__("flashoptim_dist").layout.resolve_shard(p)
        s = spec.segments[0]
        rec[name] = {"gs": s.global_start, "L": s.length,
                     **{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}}
    ck.save(os.path.join(root, "cut"), m, opt, lr_scheduler=sched, step=3)
    return rec


def _cut_load_save(rank, world, root, tag):
    import flashoptim_dist.checkpoint as ck

    m = _flat_model(rank, world, seed=5)
    opt = C.make_opt(m)
    ck.load(os.path.join(root, "cut"), m, opt)
    n = C.check_local_state_equals(C.canonical_tensors(os.path.join(root, "cut")), m, opt)
    ck.save(os.path.join(root, tag), m, opt)
    return n


def test_cut_groups_are_agreed_to_one_canonical_scale(tmp_path):
    import flashoptim_dist.numerics as nx

    root = str(tmp_path)
    recs = run_distributed(_cut_train_save, 2, root)
    canon = C.canonical_tensors(os.path.join(root, "cut"))
    G = 32
    n_cut = n_requant = 0
    for name, shape in CUT_SHAPES.items():
        numel = torch.Size(shape).numel()
        for state, kind in (("exp_avg", "signed"), ("exp_avg_sq", "sqrt")):
            scales = canon[f"flash.{name}.{state}.scales"].reshape(-1)  # (rows, L/G) or flat: group order
            codes = canon[f"flash.{name}.{state}"].reshape(-1)
            deq = nx.dequantize_signed if kind == "signed" else nx.dequantize_sqrt
            live_scale = {}
            for r in recs:
                e = r[name]
                g0 = e["gs"] // G
                for i, s in enumerate(e[state + "_scales"]):
                    live_scale.setdefault(g0 + i, []).append(float(s))
            for g, vals in live_scale.items():
                assert float(scales[g]) == max(vals), f"{name} {state} group {g}: saved {float(scales[g])}, live {vals}"
                n_cut += len(vals) > 1
            for r in recs:  # codes: unchanged where the side's scale was the agreed one, else re-expressed
                e = r[name]
                gs, L = e["gs"], e["L"]
                for g in range(gs // G, (gs + L - 1) // G + 1):
                    a, b = max(gs, g * G), min(gs + L, (g + 1) * G, numel)
                    live_codes = e[state][a - gs : b - gs]
                    s_live = e[state + "_scales"][g - gs // G : g - gs // G + 1]
                    disk = codes[a:b]
                    if float(s_live) == float(scales[g]):
                        assert torch.equal(disk, live_codes), f"{name} {state} group {g}"
                        continue
                    n_requant += 1
                    S = float(scales[g])
                    want = deq(live_codes, s_live, G, a % G)
                    got = deq(disk, scales[g : g + 1], G, a % G)
                    # re-expressed against the agreed scale S: within half a code step of S
                    # (companded int8: S/127; sqrt codes: |sqrt(v) - sqrt(v')| <= S/510)
                    if kind == "signed":
                        assert torch.all((got - want).abs() <= S / 127 + 1e-12), (name, state, g)
                    else:
                        assert torch.all((got.sqrt() - want.sqrt()).abs() <= S / 510 * (1 + 1e-3)), (name, state, g)
    assert n_cut >= 6, "the splits must cut groups for this test to mean anything"
    assert n_requant >= 3, "some side of a cut group must have had the smaller scale"
    # the file is canonical: loading it on 3 ranks (other cuts) or 1 process and saving again gives the same bytes
    ns = run_distributed(_cut_load_save, 3, root, "cut3")
    assert sum(ns) > 0
    assert not C.diff_canonical(canon, C.canonical_tensors(os.path.join(root, "cut3")))
    import flashoptim_dist.checkpoint as ck

    m = _flat_model(0, 1, seed=9)
    opt = C.make_opt(m)
    ck.load(os.path.join(root, "cut"), m, opt)
    ck.save(os.path.join(root, "cut1"), m, opt)
    assert not C.diff_canonical(canon, C.canonical_tensors(os.path.join(root, "cut1")))


# ------------------------------------------------------- FSDP2 root left unsharded by an eval forward


def _eval_forward(wrapped, step):
    with torch.no_grad():
        wrapped.eval()
        wrapped(C.batch(step)[0])
        wrapped.train()


def _unsharded(module):
    return sorted(C.clean(n) for n, p in module.named_parameters() if type(p).__name__ != "DTensor")


def _save_after_eval_forward(rank, world, root):
    import flashoptim_dist.checkpoint as ck
    from flashoptim_dist.checkpoint import _views

    model = C.make_net(0)
    wrapped, module = C.wrap("fsdp2", model, world)
    opt = C.make_opt(module)
    sched = C.make_sched(opt)
    C.real_step(wrapped, opt, 0)
    ck.save(os.path.join(root, "before_eval"), wrapped, opt, lr_scheduler=sched, step=1)
    _eval_forward(wrapped, 1)
    out = {"unsharded_after_eval": _unsharded(module)}
    # the safety net alone (automatic reshard switched off): refuses before writing, naming the parameter
    orig = _views.reshard_fsdp2
    _views.reshard_fsdp2 = lambda m: 0
    try:
        ck.save(os.path.join(root, "refused"), wrapped, opt, step=1)
        out["refused"] = None
    except ck.CheckpointError as e:
        out["refused"] = str(e)
    finally:
        _views.reshard_fsdp2 = orig
    ck.save(os.path.join(root, "after_eval"), wrapped, opt, lr_scheduler=sched, step=1)
    out["unsharded_after_save"] = _unsharded(module)
    out["loss_after"] = C.real_step(wrapped, opt, 2)  # training goes on (the root is gathered again)
    # a load while the root is unsharded must land in the sharded parameters the optimizer updates
    model2 = C.make_net(1)
    w2, m2 = C.wrap("fsdp2", model2, world)
    opt2 = C.make_opt(m2, lr=0.5)
    C.real_step(w2, opt2, 5)
    _eval_forward(w2, 6)
    ck.load(os.path.join(root, "after_eval"), w2, opt2)
    out["n_loaded"] = C.check_local_state_equals(C.canonical_tensors(os.path.join(root, "after_eval")), m2, opt2)
    out["loss_loaded"] = C.real_step(w2, opt2, 2)
    return out


def test_fsdp2_save_after_eval_forward_is_complete(tmp_path):
    """After a forward without backward FSDP2 leaves the root unit (emb, head, bias2) unsharded;
    save/load reshard it first instead of silently leaving out its optimizer state."""
    root = str(tmp_path)
    res = run_distributed(_save_after_eval_forward, 2, root)
    r0 = res[0]
    assert r0["unsharded_after_eval"] == ["bias2", "emb.weight", "head.weight"], (
        "the scenario needs FSDP2 to leave the root's parameters unsharded after an eval forward: "
        f"{r0['unsharded_after_eval']}")
    msg = r0["refused"]
    assert msg is not None and "emb.weight" in msg and "m.reshard()" in msg, msg
    assert not os.path.exists(os.path.join(root, "refused")) and not [n for n in os.listdir(root)
                                                                      if n.startswith(".refused")]
    assert all(r["unsharded_after_save"] == [] for r in res)
    before = C.canonical_tensors(os.path.join(root, "before_eval"))
    assert {"flash.emb.weight.exp_avg", "flash.head.weight.rho", "flash.bias2.exp_avg_sq.scales"} <= set(before)
    bad = C.diff_canonical(before, C.canonical_tensors(os.path.join(root, "after_eval")))
    assert not bad, f"the save after the eval forward differs from the one before it: {bad[:6]}"
    assert all(r["n_loaded"] > 0 for r in res)
    # same state, same batch: the step after the load is the step after the save
    assert res[0]["loss_loaded"] == res[0]["loss_after"]


# ------------------------------------------------------------------ a rank dies in the middle of a save


def _save_at(rank, world, root, name, steps, overwrite):
    import flashoptim_dist.checkpoint as ck

    model = C.make_net(0)
    wrapped, module = C.wrap("fsdp2", model, world)
    opt = C.make_opt(module)
    sched = C.make_sched(opt)
    C.train_steps(module, opt, sched, range(1, steps + 1))
    ck.save(os.path.join(root, name), wrapped, opt, lr_scheduler=sched, step=steps, overwrite=overwrite)


def _crash_while_saving(rank, world, root):
    import torch.distributed.checkpoint.filesystem as fs

    if rank == 1:
        orig = fs._write_item
        calls = {"n": 0}

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # some items of this rank's file are already on disk
                os._exit(17)
            return orig(*a, **k)

        fs._write_item = dying
    _save_at(rank, world, root, "ck", K + 2, True)


def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    import flashoptim_dist.checkpoint as ck

    root = str(tmp_path)
    run_distributed(_save_at, 2, root, "ck", K, False)
    before = C.canonical_tensors(os.path.join(root, "ck"))
    with pytest.raises(Exception) as ei:
        run_distributed(_crash_while_saving, 2, root, timeout=180, pg_timeout_s=60)
    assert "exit code 17" in str(ei.value), f"expected rank 1 to die with os._exit(17), got: {ei.value}"
    leftovers = [n for n in os.listdir(root) if n.startswith(".ck.tmp-")]
    assert leftovers, "the interrupted save should have left its temp directory (and nothing at the final path)"
    # the partial directory is never taken for a checkpoint
    with pytest.raises(ck.IncompleteCheckpointError, match="COMPLETE is missing"):
        ck.load(os.path.join(root, leftovers[0]), *C.fresh(0))
    # the previous checkpoint is intact and loads
    assert not C.diff_canonical(before, C.canonical_tensors(os.path.join(root, "ck")))
    model = C.make_net(3)
    opt = C.make_opt(model)
    info = ck.load(os.path.join(root, "ck"), model, opt)
    assert info["step"] == K
    assert C.check_local_state_equals(before, model, opt) > 0
    # the next save of the same path removes the leftovers
    run_distributed(_save_at, 2, root, "ck", K + 1, True)
    assert not [n for n in os.listdir(root) if n.startswith(".ck.")]
    assert ck.load(os.path.join(root, "ck"), *C.fresh(0))["step"] == K + 1


# ------------------------------------------------------------------------------ DeepSpeed ZeRO

DS_TIMEOUT_S = 300


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_results(fsdp2_4rank):
    """Run tests/ckpt_ds_cases.py on 2 CPU ranks through the deepspeed launcher (once)."""
    require_module("deepspeed")
    import json
    import signal
    import subprocess
    import sys

    root, _ = fsdp2_4rank
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helper scripts
    out = os.path.join(root, "ds_results.json")
    log = os.path.join(root, "ds.log")
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE="2", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               CKPT_DS_DUMP_AFTER_S=str(DS_TIMEOUT_S - 40),  # a hang dumps every thread's stack into the log
               PYTHONPATH=os.path.dirname(here) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(here, "ckpt_ds_cases.py"), "--out", out, "--root", root]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(here),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=DS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    if not os.path.exists(out):
        pytest.fail(f"ckpt_ds_cases.py wrote no results (exit {rc}); log tail:\n{open(log).read()[-6000:]}")
    with open(out) as f:
        return root, json.load(f)


def _ds_case(ds_results, name):
    root, res = ds_results
    rec = res.get(name)
    assert rec is not None, f"case {name} did not run"
    if "error" in rec:
        pytest.fail(f"case {name} failed on rank 0:\n{rec['error']}")
    return root, rec


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fsdp2_4_ranks_loads_under_zero(ds_results, stage):
    root, rec = _ds_case(ds_results, f"from_fsdp2_z{stage}")
    assert rec["n"] > 0 and rec["saved_world"] == 4 and rec["step"] == K and rec["extra"] == {"data_pos": 1234}
    assert rec["lr"] == pytest.approx(1e-2 / (1 + K))
    assert torch.isfinite(torch.tensor(rec["loss"]))
    bad = C.diff_canonical(C.canonical_tensors(os.path.join(root, "k1_ref")),
                           C.canonical_tensors(os.path.join(root, f"k1_zero{stage}")))
    assert not bad, f"next step after loading under ZeRO-{stage} differs from the uninterrupted FSDP2 run: {bad[:6]}"


def test_zero2_checkpoint_with_cut_fragments_is_canonical(ds_results):
    import flashoptim_dist.checkpoint as ck
    from ds_model import make_model

    root, rec = _ds_case(ds_results, "zero2_cut")
    assert rec["cut_boundaries"] > 0, "the ZeRO-2 partitions must cut groups for this test to mean anything"
    assert rec["n"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    z2 = C.canonical_tensors(os.path.join(root, "z2"))
    assert not C.diff_canonical(z2, C.canonical_tensors(os.path.join(root, "z2_z3")))
    m = make_model(seed=7)
    opt = __import__("flashoptim_dist").FlashAdamW(m.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    ck.load(os.path.join(root, "z2"), m, opt)
    ck.save(os.path.join(root, "z2_plain"), m, opt, step=3)
    assert not C.diff_canonical(z2, C.canonical_tensors(os.path.join(root, "z2_plain")))


def test_zero2_round_robin_gpt_checkpoint_holds_each_parameters_values(ds_results):
    """ZeRO-2 with round_robin_gradients on the trainer's GPT: DeepSpeed lays the flat buffer out
    in round-robin order but computes ``_hp_mapping`` in parameter order, so fragments read from
    it name the wrong elements. The checkpoint must hold every parameter's own values (oracle:
    the engine's full bf16 copy), and loading it must give them back."""
    root, rec = _ds_case(ds_results, "gpt_round_robin_z2")
    assert rec["n"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    canon = C.canonical_tensors(os.path.join(root, "gpt_rr"))
    for tag in ("live", "loaded"):
        params = torch.load(os.path.join(root, f"gpt_rr_{tag}.pt"))
        assert len(params) == 21
        bad = [n for n, p in params.items() if not torch.equal(C.bits(canon["model." + n]), C.bits(p))]
        assert not bad, f"{tag}: the checkpoint's values of {bad[:5]} are not the engine's ({len(bad)} parameters)"


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_native_deepspeed_checkpoint(ds_results, stage, capsys):
    """`ckpt convert`: a checkpoint DeepSpeed wrote itself becomes a canonical one whose masters
    are DeepSpeed's fp32 export (bf16 + ρ) and whose codes are the client optimizer's."""
    import flashoptim_dist as fo
    import flashoptim_dist.checkpoint as ck
    import flashoptim_dist.deepspeed as fds
    from flashoptim_dist.checkpoint import cli
    from ds_model import make_model

    root, _ = _ds_case(ds_results, f"native_z{stage}")
    src, out = os.path.join(root, f"ds_native_z{stage}"), os.path.join(root, f"conv_z{stage}")
    assert cli.main(["convert", src, out]) == 0
    assert f"ZeRO-{stage}" in capsys.readouterr().out
    m = make_model(seed=5)
    opt = fo.FlashAdamW(m.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    info = ck.load(out, m, opt)
    assert info["saved_world_size"] == 2
    want = fds.get_fp32_state_dict_from_zero_checkpoint(src, tag="t")
    import flashoptim_dist.numerics as nx

    for n, p in m.named_parameters():
        got = nx.merge_master(p.reshape(-1), opt.state[p]["rho"])
        assert torch.equal(got, want[n].reshape(-1).float()), n
        assert opt.state[p]["step"] == 2
    # codes: every group lying wholly inside one rank's fragment equals the client state's codes
    canon = C.canonical_tensors(out)
    import glob

    checked = 0
    for f in sorted(glob.glob(os.path.join(src, "t", "*optim_states.pt"))):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if stage == 2:
            st = osd["base_optimizer_state"]["state"][0]
            r = int(f.split("zero_pp_rank_")[1].split("_")[0])
            for name, addr in osd["param_slice_mappings"][0].items():
                s, L = int(addr.start), int(addr.numel)
                # fragment start inside the parameter: rank 0 starts at 0, rank 1 where rank 0 ended
                gs = 0 if r == 0 else canon["model." + name].numel() - L
                for g0 in range(-(-gs // 32) * 32, gs + L - 31, 32):
                    a = g0 - gs
                    assert torch.equal(st["exp_avg"][s + a : s + a + 32],
                                       canon[f"flash.{name}.exp_avg"].reshape(-1)[g0 : g0 + 32]), name
                    checked += 1
    assert stage == 3 or checked > 50
