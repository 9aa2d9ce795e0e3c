#!/usr/bin/env bash
# The largest model one GPU trains (issue 17): one `flashoptim-dist train` per case on ONE device
# (engine.name=single), then a table of parameters, peak and persistent memory, tokens/s and MFU
# (counted as torchtitan does: flashoptim_dist/train/flops.py). docs/PERFORMANCE.md, "One GPU".
#
#   bash bench/one_gpu.sh flash20b=configs/one_gpu_20b.yaml \
#        adamw8b=configs/one_gpu_8b.yaml:optim.name=AdamW,optim.gradient_release=false,optim.fused=true
#
# Each case is NAME=CONFIG[:KEY=VALUE,KEY=VALUE...]; the overrides come after the config's own keys.
# A case that runs out of memory is reported as OOM (the search for the largest size is a list of
# cases; the table says which ran). Environment: STEPS (default 10), LOG_EVERY (5: the last line
# averages the steady steps), OUT (logs and per-case run folders, default /tmp/one_gpu),
# PYTHON (default python).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: one_gpu.sh NAME=CONFIG[:KEY=VALUE,...] ..." >&2; exit 2; }
out=${OUT:-/tmp/one_gpu}
mkdir -p "$out"
steps=${STEPS:-10}
rows=()
for case in "$@"; do
    name=${case%%=*}
    spec=${case#*=}
    config=${spec%%:*}
    overrides=()
    [ "$spec" != "$config" ] && IFS=, read -r -a overrides <<<"${spec#*:}"
    start=$(date +%s)
    rc=0
    ${PYTHON:-python} -m flashoptim_dist.train train --config "$config" "train.steps=$steps" \
        "train.log_every=${LOG_EVERY:-5}" train.eval_every=0 train.ckpt_every=0 train.progress=false \
        train.resume=false "train.out_dir=$out/$name" "${overrides[@]}" >"$out/$name.log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    echo "== $name (rc $rc, $secs s): $config ${overrides[*]}"
    tail -3 "$out/$name.log"
    rows+=("$(${PYTHON:-python} - "$out/$name" "$out/$name.log" "$name" "$rc" "$secs" <<'EOF'
import json, sys
from pathlib import Path
from flashoptim_dist.train.trainer import read_metrics
run, log, name, rc, secs = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
text = log.read_text(errors="replace")
status = "ok" if rc == "0" else ("OOM" if "OutOfMemoryError" in text or "out of memory" in text else f"rc {rc}")
lines = read_metrics(run / "metrics.jsonl")
train = [x for x in lines if x.get("kind") == "train"]
summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
n = summ.get("n_params")
last = train[-1] if train else {}
row = (summ.get("rows") or [{}])[0]
persistent = sum(row.get(k, 0) for k in ("param_bytes", "grad_bytes", "optim_bytes"))
mfu = last.get("mfu")
cells = [name, status, f"{n / 1e9:.2f}e9" if n else "-",
         f"{last['peak_mem_bytes'] / 2**30:.1f}" if last.get("peak_mem_bytes") else "-",
         f"{persistent / 2**30:.1f}" if persistent else "-",
         f"{persistent / n:.2f}" if persistent and n else "-",
         f"{last['tokens_per_s']:,.0f}" if last.get("tokens_per_s") else "-",
         f"{100 * mfu:.1f}" if mfu is not None else "-",
         f"{last['loss']:.3f}" if "loss" in last else "-", secs]
print("| " + " | ".join(str(c) for c in cells) + " |")
EOF
)")
done
echo
echo "| case | status | params | peak GiB | persistent GiB | B/param | tok/s (last window) | MFU % | loss | s |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
