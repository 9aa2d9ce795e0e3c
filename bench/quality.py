"""Quality benchmark (issue 13): validation loss of Flash optimizers against fp32 torch.optim.

    python bench/quality.py --group adamw --beta2 0.999 --seeds 0 1 --jobs 3 --out runs/quality
    python bench/quality.py --group small --jobs 2 --out runs/quality        # Lion and SGD
    python bench/quality.py --summarize runs/quality                         # tables only
    python bench/quality.py --tiny ...                                       # CPU smoke test

Every run is one ``flashoptim-dist train`` process (the trainer on one device, ``engine.name=
single``) on the byte-level standard-library corpus, so the comparison is the trainer's own
path: the Flash optimizers on bf16 params, the torch baselines on fp32 params with bf16
autocast, the same data order, initialisation and schedule per seed. ``--jobs`` runs that many
processes at once on the one GPU (the 125M model does not fill an H200 alone).

Groups:

* ``adamw`` — GPT 125M shapes, byte-level (vocab 256: 85M params), 1000 steps of 32 x 1024 tokens,
  lr 1e-3 cosine with 100 warm-up steps, weight decay 0.1, betas (0.9, β2):
  ``AdamW`` (fp32), ``FlashAdamW`` (defaults: stochastic rounding), ``FlashAdamW-nearest``
  (round-to-nearest codes and ρ, the pre-issue-13 numerics), ``bf16-no-master`` (bf16 params
  rounded to nearest with fp32 moments: FlashAdamW without ρ and without quantization, which
  shows what ρ buys), ``FlashAdamW-32`` (int16 ρ).
* ``small`` — the ``small`` preset (4.9M params), 1000 steps of 16 x 512 tokens: ``FlashLion`` vs
  an fp32 ``Lion`` (lr 1e-4, betas (0.9, 0.99), wd 0.1) and ``FlashSGD`` vs torch ``SGD`` (lr 0.3,
  momentum 0.9).

``--summarize`` prints, per group and β2, the validation loss at every evaluation for every run,
AdamW's seed-to-seed spread, and each variant's largest gap to the AdamW mean relative to that
spread (the target: FlashAdamW within the spread at every evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from flashoptim_dist.train.trainer import read_metrics  # noqa: E402

ADAMW_VARIANTS = {
    "AdamW": ["optim.name=AdamW"],
    "FlashAdamW": ["optim.name=FlashAdamW"],
    "FlashAdamW-nearest": ["optim.name=FlashAdamW", "optim.rounding=nearest"],
    # (check_numerics would rightly refuse it: lr 1e-3 cannot move bf16 norm gains of 1)
    "bf16-no-master": ["optim.name=FlashAdamW", "optim.master_weight_bits=null", "optim.quantize=false",
                       "optim.check_numerics=false"],
    "FlashAdamW-32": ["optim.name=FlashAdamW", "optim.master_weight_bits=32"],
    # 24-bit master, moments in fp32: separates the 8-bit moments from the master's precision
    "FlashAdamW-fp32-states": ["optim.name=FlashAdamW", "optim.quantize=false"],
}
SMALL_VARIANTS = {
    "Lion": ["optim.name=Lion", "optim.lr=1e-4", "optim.betas=[0.9,0.99]"],
    "FlashLion": ["optim.name=FlashLion", "optim.lr=1e-4", "optim.betas=[0.9,0.99]"],
    "SGD": ["optim.name=SGD", "optim.lr=0.3", "optim.momentum=0.9", "optim.weight_decay=0.0"],
    "FlashSGD": ["optim.name=FlashSGD", "optim.lr=0.3", "optim.momentum=0.9", "optim.weight_decay=0.0"],
}


def base_overrides(group: str, steps: int, tiny: bool) -> list[str]:
    common = ["model.source=gpt", "data.source=stdlib", "data.tokenizer=bytes", "engine.name=single",
              "dist.nproc_per_node=1", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
              f"train.steps={steps}", "train.ckpt_every=0", "train.log_every=50", "train.progress=false"]
    if tiny:
        return common + ["model.preset=tiny", "data.seq_len=64", "data.micro_batch_size=4", "data.global_batch_size=4",
                         "data.eval_sequences=8", "data.max_bytes=2000000", f"train.eval_every={max(1, steps // 4)}",
                         "optim.warmup_steps=2", "optim.lr=1e-3", "optim.weight_decay=0.1"]
    if group == "adamw":
        return common + ["model.preset=125m", "model.vocab_size=256", "data.seq_len=1024", "data.micro_batch_size=32",
                         "data.global_batch_size=32", "data.eval_sequences=256", "train.eval_every=125",
                         "optim.lr=1e-3", "optim.warmup_steps=100", "optim.weight_decay=0.1"]
    return common + ["model.preset=small", "data.seq_len=512", "data.micro_batch_size=16",
                     "data.global_batch_size=16", "data.eval_sequences=128", "train.eval_every=125",
                     "optim.warmup_steps=50", "optim.weight_decay=0.1"]


def plan(args) -> list[tuple[str, list[str]]]:
    runs = []
    variants = ADAMW_VARIANTS if args.group == "adamw" else SMALL_VARIANTS
    names = args.variants or list(variants)
    for beta2 in (args.beta2 if args.group == "adamw" else [None]):
        for seed in args.seeds:
            for name in names:
                tag = f"{args.group}_{name}" + (f"_b{beta2}" if beta2 is not None else "") + f"_s{seed}"
                ov = base_overrides(args.group, args.steps, args.tiny) + variants[name] + [f"train.seed={seed}"]
                if beta2 is not None:
                    ov.append(f"optim.betas=[0.9,{beta2}]")
                if args.stop_after is not None:  # one step more: the trainer stops before evaluating its last step
                    ov.append(f"train.stop_after={args.stop_after + 1}")
                ov.append(f"train.out_dir={Path(args.out) / tag}")
                runs.append((tag, ov))
    return runs


def run_one(tag: str, overrides: list[str], out: Path) -> dict:
    t0 = time.time()
    log = out / f"{tag}.log"
    cmd = [sys.executable, "-m", "flashoptim_dist.cli", "train", *overrides]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent).returncode
    res = {"tag": tag, "rc": rc, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(res), flush=True)
    if rc != 0:
        print(open(log).read()[-3000:], flush=True)
    return res


def read_evals(run_dir: Path) -> dict[int, float]:
    """Validation loss per evaluated step of one run (the trainer's metrics.jsonl)."""
    return {int(r["step"]): float(r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("kind") == "eval"}


def summarize(root: Path) -> str:
    """Markdown tables: validation loss per evaluation for every run under ``root``."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        ev = read_evals(d)
        if ev:
            runs[d.name] = ev
    blocks = []
    keys = sorted({k.rsplit("_s", 1)[0] for k in runs})
    sections = sorted({k.split("_")[0] + ("_" + k.rsplit("_b", 1)[1] if "_b" in k else "") for k in keys})
    for sec in sections:
        group, _, beta = sec.partition("_")
        members = {k: v for k, v in runs.items() if k.startswith(group + "_") and (not beta or f"_b{beta}_" in k)}
        steps = sorted({s for v in members.values() for s in v})
        title = f"{group}" + (f", β2 = {beta}" if beta else "")
        lines = [f"**{title}** — validation loss (nats/byte) at each evaluation", "",
                 "| run | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        for k in sorted(members):
            lines.append(f"| {k} | " + " | ".join(f"{members[k].get(s, float('nan')):.4f}" for s in steps) + " |")
        for base, others in (("AdamW", ("FlashAdamW", "FlashAdamW-nearest", "bf16-no-master", "FlashAdamW-32",
                                        "FlashAdamW-fp32-states")),
                             ("Lion", ("FlashLion",)), ("SGD", ("FlashSGD",))):
            ref = [v for k, v in members.items() if k.split("_")[1] == base]
            if not ref:
                continue
            mean = {s: sum(r[s] for r in ref if s in r) / max(1, sum(s in r for r in ref)) for s in steps}
            spread = {s: (max(r[s] for r in ref) - min(r[s] for r in ref)) if len(ref) > 1 else None for s in steps}
            if len(ref) > 1:
                lines.append(f"| {base} seed spread (max − min) | "
                             + " | ".join(f"{spread[s]:.4f}" for s in steps) + " |")
            for o in others:
                got = [v for k, v in members.items() if k.split("_")[1] == o]
                if not got:
                    continue
                gmean = {s: sum(r[s] for r in got if s in r) / max(1, sum(s in r for r in got)) for s in steps}
                lines.append(f"| {o} − {base} (means) | "
                             + " | ".join(f"{gmean[s] - mean[s]:+.4f}" for s in steps) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", choices=("adamw", "small"), default="adamw")
    ap.add_argument("--beta2", type=float, nargs="+", default=[0.999, 0.95])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=None, help="subset of the group's variants")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="leave every run after this step (the schedule stays that of --steps): early evaluations only")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (one GPU can take several)")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke test")
    ap.add_argument("--summarize", default=None, help="only print the tables of this folder")
    ap.add_argument("--json", default=None, help="also write every run's evaluations and seconds here")
    args = ap.parse_args()
    if args.summarize:
        root = Path(args.summarize)
        print(summarize(root))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {d.name: read_evals(d) for d in sorted(root.iterdir()) if d.is_dir()}, indent=1))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda r: run_one(r[0], r[1], out), runs))
    print(summarize(out))
    if args.json:
        record = {r["tag"]: dict(r, evals=read_evals(out / r["tag"])) for r in results}
        Path(args.json).write_text(json.dumps(record, indent=1))
    if any(r["rc"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
