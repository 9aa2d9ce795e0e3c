"""Multi-process DeepSpeed cases for tests/deepspeed/test_deepspeed.py (one launch runs them all).

Launched as ``deepspeed --num_gpus 2 tests/ds_cases.py --out RESULTS.json --workdir DIR`` with
``DS_ACCELERATOR=cpu``. Rank 0 writes one JSON record per case; the pytest side asserts on them.
Every number the assertions need is measured here; nothing is asserted here except through the
JSON, so a failing case shows up as a failing test with its traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

import flashoptim_dist  # noqa: E402
import flashoptim_dist.deepspeed as fds  # noqa: E402
from flashoptim_dist.layout import get_shard_spec  # noqa: E402
from flashoptim_dist.numerics import merge_master  # noqa: E402
from ds_model import batch, make_model, run_case_plan  # noqa: E402

STEPS, SAVE_AT, GA, PER_RANK = 10, 5, 2, 4
CONFIGS = {s: os.path.join(ROOT, "configs", f"ds_test_zero{s}.json") for s in (1, 2, 3)}


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def all_sum(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def train_steps(engine, steps):
    """Run optimizer steps ``steps`` (GA micro-steps each); per step: rank-mean loss, grad norm."""
    out = []
    for step in steps:
        tot = 0.0
        for micro in range(GA):
            x, y = batch(step, micro, rank(), PER_RANK)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            tot += loss.item()
        norm = engine.get_global_grad_norm()
        out.append({"step": step, "loss": all_sum(tot / GA) / world(), "grad_norm": float(norm)})
    return out


def snapshot(engine):
    """This rank's optimizer tensors and their Flash states, cloned."""
    opt = engine.basic_optimizer
    snap = []
    for flat in fds.flat_partitions(engine):
        st = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[flat].items()}
        snap.append((flat.detach().clone(), st))
    return snap


def mismatches(a, b) -> int:
    """Tensors/values that differ between two snapshots on this rank (summed over ranks)."""
    bad = 0
    if len(a) != len(b):
        bad += 1
    for (fa, sa), (fb, sb) in zip(a, b):
        bad += int(not torch.equal(fa, fb))
        if sorted(sa) != sorted(sb):
            bad += 1
            continue
        for k in sa:
            va, vb = sa[k], sb[k]
            same = torch.equal(va, vb) if torch.is_tensor(va) else va == vb
            bad += int(not same)
    return int(all_sum(bad))


def engine_facts(engine):
    """What the client optimizer holds, whether the master duplicates the model partition, and
    whether every flat partition carries a ShardSpec whose fragments match the model values."""
    opt = engine.optimizer
    flats = fds.flat_partitions(engine)
    facts = {
        "zero_optimizer": type(opt).__name__,
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "flat_dtypes": sorted({str(f.dtype) for f in flats}),
        "n_flats": len(flats),
        "dedupe_bytes": int(all_sum(getattr(engine, "_flashoptim_info", {}).get("dedupe_bytes", 0))),
        "missing_specs": int(all_sum(sum(get_shard_spec(f) is None for f in flats))),
    }
    # storage shared with the model partition?
    stage = fds.zero_stage_of(opt)
    shared = 0
    if stage in (1, 2):
        for i, f in enumerate(flats):
            part = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
            shared += int(f.data_ptr() == part.data_ptr())
    elif stage == 3:
        for f, lp in zip(flats, opt.fp16_partitioned_groups_flat):
            shared += int(f.data_ptr() == lp.data_ptr())
    facts["shared_with_model"] = int(all_sum(shared))
    # persistent optimizer state per element of the rank's partitions (ρ + codes + scales)
    facts["state_bytes_per_element"] = all_sum(engine.basic_optimizer.state_bytes()) / all_sum(
        sum(f.numel() for f in flats))
    facts["n_flats_total"] = int(all_sum(len(flats)))
    # every segment maps to the right parameter elements (checked against gathered full params)
    names = {n: p for n, p in engine.module.named_parameters()}
    if stage == 3:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(engine.module.parameters())):
            full = {n: p.detach().reshape(-1).clone() for n, p in names.items()}
    else:
        full = {n: p.detach().reshape(-1).clone() for n, p in names.items()}
    wrong, covered, keys = 0, 0, set()
    for f in flats:
        spec = get_shard_spec(f)
        if spec is None:
            continue
        pos = 0
        for s in spec.segments:
            wrong += int(s.local_start != pos)
            pos = s.local_start + s.length
            if s.key is None:
                continue
            keys.add(s.key)
            covered += s.length
            ref = full[s.key][s.global_start: s.global_start + s.length]
            # fp32 master partitions hold the model value before rounding to the model dtype
            wrong += int(not torch.equal(ref, f.detach()[s.local_start: s.local_start + s.length].to(ref.dtype)))
            wrong += int(s.global_numel != full[s.key].numel())
        wrong += int(pos != f.numel())
    facts["segment_mismatches"] = int(all_sum(wrong))
    facts["covered_elements"] = int(all_sum(covered))
    facts["model_elements"] = sum(p.numel() for p in full.values())
    return facts


_ADAM_REF = {}


def adam_reference():
    """(per-step records, final weights) of :func:`reference_run`, computed once."""
    if not _ADAM_REF:
        _ADAM_REF["v"] = reference_run(json.load(open(CONFIGS[1]))["gradient_clipping"])
    return _ADAM_REF["v"]


def _reference_loop(model, opt, max_norm, divisor):
    """One process doing what the engine does on world() ranks × GA micro-batches: each
    micro-batch loss divided by ``divisor``, gradients clipped to ``max_norm``, one step."""
    out = []
    n_chunks = GA * world()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        tot = 0.0
        for micro in range(GA):
            for r in range(world()):
                x, y = batch(step, micro, r, PER_RANK)
                loss = model(x, y)
                (loss / divisor).backward()
                tot += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        out.append({"step": step, "loss": tot / n_chunks, "grad_norm": float(norm)})
    return out, flat_params(model)


def reference_run(clip):
    """One process, no DeepSpeed: the same model, data, FlashAdamW and clipping."""
    torch.manual_seed(0)
    model = make_model()
    cfg = json.load(open(CONFIGS[1]))["optimizer"]["params"]
    opt = flashoptim_dist.FlashAdamW(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                                     weight_decay=cfg["weight_decay"])
    return _reference_loop(model, opt, clip, GA * world())


SGD = {"lr": 1.0, "momentum": 0.9}


def reference_sgd(clip, ga_mean=True):
    """FlashSGD reference; ``ga_mean=False`` sums micro-batch gradients instead of averaging them
    (what a broken gradient-accumulation scaling would do)."""
    torch.manual_seed(0)
    model = make_model()
    opt = flashoptim_dist.FlashSGD(model.parameters(), **SGD)
    return _reference_loop(model, opt, clip if clip else float("inf"), GA * world() if ga_mean else world())


def flat_params(module) -> torch.Tensor:
    """All parameters of ``module`` (gathered under ZeRO-3) as one fp32 vector, in name order."""
    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(params.values())):
            return torch.cat([params[n].detach().float().reshape(-1) for n in sorted(params)])
    return torch.cat([params[n].detach().float().reshape(-1) for n in sorted(params)])


def case_sgd(stage, clip):
    """FlashSGD (update proportional to the gradient, unlike Adam) under ZeRO-``stage`` with
    gradient accumulation and, if ``clip``, gradient_clipping — against one-process references
    with the right, no, and wrong (summed) accumulation/clipping."""
    cfg = json.load(open(CONFIGS[stage]))
    cfg["optimizer"] = {"type": "FlashSGD", "params": dict(SGD)}
    cfg["gradient_clipping"] = clip
    engine, _, _, _ = fds.initialize(model=make_model(), config=cfg)
    rec = {"train": train_steps(engine, range(STEPS)), "clip": engine.gradient_clipping()}
    theta = flat_params(engine.module)
    destroy(engine)
    theta0 = flat_params(make_model())
    rec["ref"], ref = reference_sgd(clip)
    rec["ref_no_clip"], no_clip = reference_sgd(0.0)
    rec["ref_ga_sum"], ga_sum = reference_sgd(clip, ga_mean=False)
    # distance of the final weights, relative to how far the reference moved them
    moved = float((ref - theta0).norm())
    rec["weight_err"] = {
        "ref": float((theta - ref).norm()) / moved,
        "no_clip": float((theta - no_clip).norm()) / moved,
        "ga_sum": float((theta - ga_sum).norm()) / moved,
    }
    return rec


def destroy(engine):
    fn = getattr(engine, "destroy", None)
    if fn is not None:
        fn()


def case_stage(stage, workdir, how):
    """Train from the JSON config, save at SAVE_AT, export, resume in a fresh engine."""
    rec = {}
    ckdir = os.path.join(workdir, f"ckpt_z{stage}")
    args = None
    kw = {}
    if how == "args":
        args = SimpleNamespace(deepspeed_config=CONFIGS[stage], local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    else:
        kw["config"] = CONFIGS[stage]
    t0 = time.time()
    engine, opt, _, _ = fds.initialize(args=args, model=make_model(), **kw)
    rec["facts"] = engine_facts(engine)
    rec["clip"] = engine.gradient_clipping()
    rec["train"] = train_steps(engine, range(SAVE_AT))
    engine.save_checkpoint(ckdir, tag="s5")
    dist.barrier()
    at_save = snapshot(engine)

    # export: fp32 = bf16 + ρ per fragment, and DeepSpeed's stock converter would have lost ρ
    exported = fds.get_fp32_state_dict_from_zero_checkpoint(ckdir, tag="s5")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as stock_export

    stock = stock_export(ckdir, tag="s5")
    wrong, rho_nonzero, differs_from_bf16, stock_is_bf16 = 0, 0, 0, 0
    for flat in fds.flat_partitions(engine):
        spec = get_shard_spec(flat)
        rho = opt.state[flat]["rho"] if "rho" in opt.state[flat] else None
        master = merge_master(flat.detach().reshape(-1), rho)
        for s in spec.segments:
            if s.key is None:
                continue
            sl = slice(s.local_start, s.local_start + s.length)
            got = exported[s.key].reshape(-1)[s.global_start: s.global_start + s.length]
            wrong += int(got.dtype != torch.float32 or not torch.equal(got, master[sl]))
            if rho is not None:
                rho_nonzero += int((rho[sl] != 0).sum())
            differs_from_bf16 += int((got != flat.detach()[sl].float()).sum())
            st = stock[s.key].reshape(-1)[s.global_start: s.global_start + s.length]
            stock_is_bf16 += int(not torch.equal(st.float(), flat.detach()[sl].float()))
    names = dict(engine.module.named_parameters())
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in names.items()}
    rec["export"] = {
        "fragment_mismatches": int(all_sum(wrong)),
        "rho_nonzero": int(all_sum(rho_nonzero)),
        "differs_from_bf16": int(all_sum(differs_from_bf16)),
        "stock_not_bf16": int(all_sum(stock_is_bf16)),
        "keys_match": sorted(exported) == sorted(shapes),
        "shapes_match": all(list(exported[n].shape) == shapes[n] for n in shapes if n in exported),
    }
    rec["universal"] = universal_round_trip(engine, opt, stage, ckdir, exported, workdir)
    rec["train"] += train_steps(engine, range(SAVE_AT, STEPS))
    rec["state_bytes_per_element"] = engine_facts(engine)["state_bytes_per_element"]
    final = snapshot(engine)
    ref_records, ref_theta = adam_reference()
    moved = float((ref_theta - flat_params(make_model())).norm())
    rec["weight_err"] = float((flat_params(engine.module) - ref_theta).norm()) / moved
    destroy(engine)
    del engine, opt

    engine2, _, _, _ = fds.initialize(args=args, model=make_model(seed=123), **kw)  # other init: load must win
    engine2.load_checkpoint(ckdir, tag="s5")
    rec["after_load_mismatches"] = mismatches(at_save, snapshot(engine2))
    rec["resumed"] = train_steps(engine2, range(SAVE_AT, STEPS))
    rec["final_mismatches"] = mismatches(final, snapshot(engine2))
    rec["facts_after_load"] = engine_facts(engine2)
    destroy(engine2)
    rec["seconds"] = time.time() - t0
    return rec


def _universal_tensor(path):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj["param"] if isinstance(obj, dict) else obj


def universal_round_trip(engine, opt, stage, ckdir, exported, workdir):
    """Flash checkpoint → plain Adam checkpoint → DeepSpeed's ds_to_universal → a DeepSpeed engine
    with torch AdamW loading it (checkpoint.load_universal): masters carry ρ, moments are the
    dequantized Flash moments, at every step of the chain."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from flashoptim_dist.deepspeed.plain_checkpoint import convert_to_plain_checkpoint

    plain, uni = os.path.join(workdir, f"plain_z{stage}"), os.path.join(workdir, f"universal_z{stage}")
    sgd_refused = None
    if rank() == 0:
        # a non-Adam Flash checkpoint has no plain DeepSpeed form: refused, naming the alternative
        import glob
        import shutil

        fake = os.path.join(workdir, f"sgd_z{stage}")
        shutil.copytree(os.path.join(ckdir, "s5"), os.path.join(fake, "s5"), dirs_exist_ok=True)
        for f in glob.glob(os.path.join(fake, "s5", "*optim_states.pt")):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            client = sd["optimizer_state_dict"]["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]
            client["flashoptim"]["family"] = "sgd"
            torch.save(sd, f)
        try:
            convert_to_plain_checkpoint(fake, os.path.join(workdir, f"sgd_plain_z{stage}"), tag="s5")
            sgd_refused = False
        except ValueError as e:
            sgd_refused = "ckpt convert" in str(e)
        src = convert_to_plain_checkpoint(ckdir, plain, tag="s5", overwrite=True)
        ds_to_universal(SimpleNamespace(input_folder=src, output_folder=os.path.join(uni, "s5"), num_extract_workers=1,
                                        num_merge_workers=1, keep_temp_folder=False, strict=True,
                                        inject_missing_state=True))
    dist.barrier()
    # the universal files against this rank's live optimizer (its own layout, not the offline one)
    fp32_wrong, moment_wrong, checked = 0, 0, 0
    for flat in fds.flat_partitions(engine):
        spec = get_shard_spec(flat)
        dq = engine.basic_optimizer.dequantized_state(flat, {})
        for s in spec.segments:
            if s.key is None or s.length == 0:
                continue
            sl = slice(s.local_start, s.local_start + s.length)
            base = os.path.join(uni, "s5", "zero", s.key)
            full = _universal_tensor(os.path.join(base, "fp32.pt")).reshape(-1)
            fp32_wrong += int(not torch.equal(full, exported[s.key].reshape(-1)))
            for name in ("exp_avg", "exp_avg_sq"):
                got = _universal_tensor(os.path.join(base, f"{name}.pt")).reshape(-1)[
                    s.global_start: s.global_start + s.length
                ]
                moment_wrong += int(not torch.equal(got, dq[name].reshape(-1)[sl]))
            checked += 1
    # DeepSpeed itself loads it into torch AdamW with fp32 masters (its default bf16 mode)
    import json as _json

    with open(CONFIGS[stage]) as fh:
        cfg = _json.load(fh)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": 0.01, "torch_adam": True}}
    cfg["checkpoint"] = {"load_universal": True}
    eng, _, _, _ = deepspeed.initialize(model=make_model(seed=7), config=cfg)
    eng.load_checkpoint(uni, tag="s5", load_optimizer_states=True, load_lr_scheduler_states=False)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    loaded_wrong = 0
    for n, p in eng.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        loaded_wrong += int(full is None or not torch.equal(full.reshape(-1).cpu(), exported[n].reshape(-1)))
        for name in ("exp_avg", "exp_avg_sq"):
            st = safe_get_full_optimizer_state(p, name)
            want = _universal_tensor(os.path.join(uni, "s5", "zero", n, f"{name}.pt"))
            loaded_wrong += int(st is None or not torch.equal(st.reshape(-1).cpu(), want.reshape(-1)))
    destroy(eng)
    return {"fp32_mismatches": int(all_sum(fp32_wrong)), "moment_mismatches": int(all_sum(moment_wrong)),
            "fragments_checked": int(all_sum(checked)), "loaded_mismatches": int(all_sum(loaded_wrong)),
            "n_params": len(exported), "sgd_refused": sgd_refused}


def case_fp32_partitions(workdir):
    """The user insists on fp32 partitions (bf16_master_weights_and_grads=false) and passes a Flash
    optimizer instance: ZeRO keeps fp32 masters, the optimizer keeps 8-bit states and no ρ."""
    cfg = json.load(open(CONFIGS[2]))
    cfg.pop("optimizer")
    cfg["bf16"]["bf16_master_weights_and_grads"] = False
    model = make_model()
    opt = flashoptim_dist.FlashAdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    engine, _, _, _ = fds.initialize(model=model, optimizer=opt, config=cfg)
    rec = {"train": train_steps(engine, range(3))}
    rec["facts"] = engine_facts(engine)
    flats = fds.flat_partitions(engine)
    rec["state_keys"] = sorted(engine.basic_optimizer.state[flats[0]])
    rec["state_dtypes"] = {k: str(v.dtype) for k, v in engine.basic_optimizer.state[flats[0]].items()
                           if torch.is_tensor(v)}
    rec["same_optimizer"] = engine.basic_optimizer is opt
    destroy(engine)
    return rec


def case_zero3_zero_init(workdir):
    """ZeRO-3 with the model built under deepspeed.zero.Init (parameters partitioned before the
    optimizer exists, as Hugging Face does for large models)."""
    cfg = json.load(open(CONFIGS[3]))
    prepared, _ = fds.prepare_config(cfg, deepspeed_version=deepspeed.__version__)
    with deepspeed.zero.Init(config_dict_or_path=prepared, dtype=torch.bfloat16):
        model = make_model()
    rec = {"partitioned_before_init": all(hasattr(p, "ds_id") for p in model.parameters())}
    engine, _, _, _ = fds.initialize(model=model, config=cfg)
    rec["facts"] = engine_facts(engine)
    rec["train"] = train_steps(engine, range(3))
    rec["facts_after_steps"] = engine_facts(engine)
    destroy(engine)
    return rec


def case_bf16_optimizer_pick(workdir):
    """Plain DeepSpeed with the rejected ZeRO-1 config really picks the fp32 BF16_Optimizer, and
    flashoptim_dist.deepspeed refuses the same config naming the key."""
    cfg = json.load(open(CONFIGS[1]))
    cfg.pop("optimizer")
    cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    cfg["zero_allow_untested_optimizer"] = True
    model = make_model()
    # a non-Flash optimizer goes through flashoptim_dist.deepspeed.initialize to DeepSpeed unchanged
    engine, _, _, _ = fds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    rec = {
        "passthrough_no_flash_info": not hasattr(engine, "_flashoptim_info"),
        "zero_optimizer": type(engine.optimizer).__name__,
        "client_param_dtypes": sorted({str(p.dtype) for g in engine.basic_optimizer.param_groups for p in g["params"]}),
    }
    destroy(engine)
    cfg["optimizer"] = {"type": "FlashAdamW", "params": {"lr": 1e-3}}
    try:
        fds.initialize(model=make_model(), config=cfg)
        rec["flash_error"] = None
    except fds.FlashDeepSpeedConfigError as e:
        rec["flash_error"] = str(e)
    return rec


def case_register(workdir):
    """Plain deepspeed.initialize with {"optimizer": {"type": "FlashAdamW"}}: fails without
    register(), works with it (ShardSpecs attached, ρ master), and is plain again after unregister()."""
    rec = {}
    cfg = json.load(open(CONFIGS[2]))
    try:
        deepspeed.initialize(model=make_model(), config=cfg)
        rec["before_error"] = None
    except Exception as e:  # DeepSpeed's own assertion
        rec["before_error"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    fds.register()
    fds.register()  # idempotent
    try:
        engine, _, _, _ = deepspeed.initialize(model=make_model(), config=cfg)
        rec["facts"] = engine_facts(engine)
        rec["train"] = train_steps(engine, range(2))
        destroy(engine)
        # a config without a Flash optimizer goes to DeepSpeed untouched
        plain = dict(cfg)
        plain.pop("optimizer")
        plain["zero_allow_untested_optimizer"] = True
        model = make_model()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               config=plain)
        rec["plain_flat_dtype"] = str(fds.flat_partitions(engine)[0].dtype)
        rec["plain_spec"] = get_shard_spec(fds.flat_partitions(engine)[0]) is not None
        destroy(engine)
    finally:
        fds.unregister()
    rec["registered_after_unregister"] = fds.is_registered()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--cases", default="all")
    ap.add_argument("--local_rank", type=int, default=0)
    a, _ = ap.parse_known_args()
    # a case that raises on one rank leaves the other in a collective: time out instead of hanging
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {"world": world(), "deepspeed": deepspeed.__version__}
    todo = a.cases.split(",")
    plan = [("z1", lambda: case_stage(1, a.workdir, "config")),
            ("z2", lambda: case_stage(2, a.workdir, "args")),
            ("z3", lambda: case_stage(3, a.workdir, "config")),
            ("bf16opt", lambda: case_bf16_optimizer_pick(a.workdir)),
            ("fp32parts", lambda: case_fp32_partitions(a.workdir)),
            ("zero_init", lambda: case_zero3_zero_init(a.workdir)),
            ("register", lambda: case_register(a.workdir)),
            ("reference", lambda: adam_reference()[0])]
    for st in (1, 2, 3):
        plan.append((f"sgd_ga_z{st}", lambda st=st: case_sgd(st, 0.0)))
        plan.append((f"sgd_clip_z{st}", lambda st=st: case_sgd(st, 0.3)))
    run_case_plan(plan, todo, a.out, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
