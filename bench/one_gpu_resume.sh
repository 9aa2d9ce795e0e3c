#!/usr/bin/env bash
# Save, resume and export on one GPU (issue 17 item 2), through `flashoptim-dist train`:
#   A  STEPS steps uninterrupted (no checkpoint: the reference losses);
#   B  the same run with a checkpoint at step AT, stopped after step AT+1 as if killed (train.stop_after
#      leaves without the checkpoint of its own step) (size, seconds to save, peak host memory of the
#      process);
#   C  B resumed from that checkpoint up to STEPS (seconds to load); its first loss compared with
#      B's loss of the same step, bit for bit, and A's losses beside B's and C's (run-to-run drift);
#   E  the checkpoint exported to safetensors (--dtype EXPORT_DTYPE): size, seconds, peak host memory.
# The checkpoint and the export are deleted at the end (the device disk is 64 GiB).
#
#   CONFIG=configs/one_gpu_8b.yaml bash bench/one_gpu_resume.sh [KEY=VALUE ...]
#
# Environment: CONFIG (default configs/one_gpu_8b.yaml), STEPS (20), AT (10), EXPORT_DTYPE (bf16),
# OUT (work folder, default /tmp/one_gpu_resume), PYTHON (default python). Extra arguments are
# config overrides for all three runs.
set -euo pipefail
py=${PYTHON:-python}
out=${OUT:-/tmp/one_gpu_resume}
config=${CONFIG:-configs/one_gpu_8b.yaml}
steps=${STEPS:-20}
at=${AT:-10}
rm -rf "$out" && mkdir -p "$out"
common=(--config "$config" "train.steps=$steps" train.log_every=1 train.eval_every=0 train.progress=false "$@")

measure() {  # measure NAME CMD...: run CMD, print its seconds and the peak RSS of its processes
    local name=$1; shift
    "$py" - "$name" "$out/$name.log" "$@" <<'EOF'
import resource, subprocess, sys, time
name, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
t = time.perf_counter()
with open(log, "w") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
print(f"== {name}: rc {rc}, {time.perf_counter() - t:.0f} s, peak host RSS {rss:.1f} GiB", flush=True)
sys.exit(rc)
EOF
}

measure A "$py" -m flashoptim_dist.train train "${common[@]}" "train.out_dir=$out/a" train.ckpt_every=0 \
    train.resume=false
measure B "$py" -m flashoptim_dist.train train "${common[@]}" "train.out_dir=$out/b" "train.ckpt_every=$at" \
    "train.stop_after=$((at + 1))" train.resume=false train.keep_checkpoints=1
ck=$(find "$out/b/checkpoints" -maxdepth 1 -name "step_*" | sort | tail -1)
echo "checkpoint $ck: $(du -sb "$ck" | cut -f1) bytes"
grep -iE "checkpoint|saved" "$out/B.log" | tail -3 || true
cp "$out/b/metrics.jsonl" "$out/B.metrics.jsonl"  # C rewrites the lines after the checkpoint
measure C "$py" -m flashoptim_dist.train train "${common[@]}" "train.out_dir=$out/b" train.ckpt_every=0 \
    train.resume=true
grep -iE "resum|load" "$out/C.log" | tail -3 || true
# Two comparisons. Resume: B's step AT+1 (trained on the weights of step AT, then killed) against
# C's step AT+1 (the same weights read back from the checkpoint, the same batch): equal when the
# checkpoint restores every bit. Run to run: A against B up to AT+1, two identical runs from
# scratch: on a GPU they drift apart (atomics in backward kernels), which bounds how well *any*
# continuation can match A after the resume point.
"$py" - "$out/a/metrics.jsonl" "$out/B.metrics.jsonl" "$out/b/metrics.jsonl" "$at" <<'EOF'
import sys
from flashoptim_dist.train.trainer import read_metrics
def losses(path):
    return {r["step"]: r["loss"] for r in read_metrics(path) if r.get("kind") == "train"}
a, b, c, at = losses(sys.argv[1]), losses(sys.argv[2]), losses(sys.argv[3]), int(sys.argv[4])
s = at + 1
print(f"resume: step {s} loss, killed run {b.get(s)!r} vs resumed {c.get(s)!r} -> "
      + ("EQUAL" if b.get(s) == c.get(s) else "DIFFERENT"))
print("| step | A (uninterrupted) | B (killed after AT+1) / C (resumed) | B or C - A |\n|---:|---:|---:|---:|")
for k in sorted(a):
    other = b.get(k) if k <= s else c.get(k)
    d = float("nan") if other is None else other - a[k]
    print(f"| {k} | {a[k]:.6f} | {float('nan') if other is None else other:.6f} | {d:+.2e} |")
EOF
measure E "$py" -m flashoptim_dist.checkpoint.cli export "$ck" "$out/export" --dtype "${EXPORT_DTYPE:-bf16}"
echo "export: $(du -sb "$out/export" | cut -f1) bytes in $(find "$out/export" -type f | wc -l) files"
df -h "$out" | tail -1
rm -rf "$out/b/checkpoints" "$out/export"
