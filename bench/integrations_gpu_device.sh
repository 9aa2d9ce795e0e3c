#!/usr/bin/env bash
# bench/integrations_gpu.sh on the device machine (one H200, torch 2.11, no network), in one command
# from the repo root, with OUT set to the folder that comes back and carry [".gpu_carry"]:
#
#   OUT=/tmp/out bash bench/integrations_gpu_device.sh
#
# .gpu_carry/ (untracked, in .git/info/exclude; bench/gpu_carry.txt says what it holds and from where):
#   whl/             torchtitan 0.3.0 and the requirements the image lacks, installed with --no-deps
#                    into /tmp/site unless torchtitan 0.3.0 is importable already;
#   torchtitan_src/  TORCHTITAN_REPO: torchtitan's tests/assets/tokenizer and a STAND-IN
#                    tests/assets/c4_test (the real data set is not in the mirror; its losses are not
#                    torchtitan's reference losses).
# torchtitan 0.3.0 needs two things of torch 2.14 that the image's torch lacks:
# torch.distributed.fsdp.DataParallelMeshDims (imported at module level) and
# torch.distributed.set_timeout (called after step 1). The install in /tmp/site gets a module that
# adds them when missing (TT_TORCH_COMPAT=0: not): set_timeout as torch 2.14 writes it
# (ProcessGroup.set_timeout), DataParallelMeshDims as a stub that refuses to be built, which on one
# rank torchtitan never does (fully_shard(dp_mesh_dims=...) is 2.14 too); summary.txt says whether
# it was used. Parts run one by one, examples first: accelerate, hf-trainer, lightning (one GPU:
# devices=1, which integrations_gpu.sh prints), torchtitan; NPROC=1; checkpoints and dump folders in
# WORK (/tmp/integrations_gpu); each run is cut at a time limit so that the whole ends within
# DEADLINE_S (540 s) of the start.
# Back in $OUT: summary.txt (versions, each part's exit status and the lines to record, printed last
# too), integrations/console.log (everything printed), integrations/logs.tar.gz (each run's log, the
# train.py files run, a listing of WORK).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$(mkdir -p "${OUT:?set OUT to the folder that comes back}/integrations" && cd "$OUT" && pwd)
CARRY=$REPO/.gpu_carry
WORK=${WORK:-/tmp/integrations_gpu}
SITE=${SITE:-/tmp/site}
DEADLINE_S=${DEADLINE_S:-540}
SUMMARY=$OUT/summary.txt
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HOME=/tmp/hf_home HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCHTITAN_REPO=$CARRY/torchtitan_src NPROC=${NPROC:-1}

note() { echo "$*" | tee -a "$SUMMARY"; }
plain() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }  # without colours
left() { echo $((DEADLINE_S - SECONDS)); }

install() {
    if python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("torchtitan") != "0.3.0")' 2>/dev/null; then
        note "wheels: torchtitan 0.3.0 importable already ($SITE)"
    else
        local whl=("$CARRY"/whl/*.whl)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
        note "wheels: ${#whl[@]} installed into $SITE"
    fi
    local tt
    tt=$(python3 -c 'import importlib.util as u; print(u.find_spec("torchtitan").submodule_search_locations[0])')
    cat >"$tt/_gpu_bench_torch_compat.py" <<'PY'
"""torch < 2.14 for torchtitan 0.3.0; written by bench/integrations_gpu_device.sh into the device's
throwaway install. TT_TORCH_COMPAT=0 turns it off."""
import os

if os.environ.get("TT_TORCH_COMPAT", "1") != "0":
    import torch
    import torch.distributed as _dist
    import torch.distributed.fsdp as _fsdp

    if not hasattr(_fsdp, "DataParallelMeshDims"):
        class DataParallelMeshDims:
            def __init__(self, *args, **kwargs):
                raise NotImplementedError(f"torch {torch.__version__} has no fully_shard(dp_mesh_dims=...) "
                                          "(torch 2.14): run torchtitan 0.3.0 on one rank here")

        DataParallelMeshDims.__module__ = "torch.distributed.fsdp"
        _fsdp.DataParallelMeshDims = DataParallelMeshDims

    if not hasattr(_dist, "set_timeout"):
        def set_timeout(timeout, group=None):  # torch 2.14's torch.distributed.set_timeout
            from torch.distributed.distributed_c10d import _get_default_group, _rank_not_in_group

            group = _get_default_group() if group is None else group
            if _rank_not_in_group(group):
                raise ValueError("Invalid process group specified")
            group.set_timeout(timeout)

        _dist.set_timeout = set_timeout
PY
    grep -q _gpu_bench_torch_compat "$tt/__init__.py" ||
        echo "from torchtitan import _gpu_bench_torch_compat  # noqa: F401,E402" >>"$tt/__init__.py"
}

versions() {
    note "GPUs: $(nvidia-smi -L 2>/dev/null | paste -sd';' || echo 'nvidia-smi failed')"
    python3 - <<'PY' 2>&1 | tee -a "$SUMMARY" || true
import importlib.metadata as m, os, sys
import torch, torch.distributed as d, torch.distributed.fsdp as f


def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"


print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s) seen)")
print(", ".join(f"{n} {v(n)}" for n in ("torchtitan", "transformers", "accelerate", "lightning", "datasets",
                                         "torchdata", "tyro", "fsspec", "pyarrow", "huggingface-hub")))
need = [n for n, ok in (("fsdp.DataParallelMeshDims", hasattr(f, "DataParallelMeshDims")),
                        ("distributed.set_timeout", hasattr(d, "set_timeout"))) if not ok]
off = os.environ.get("TT_TORCH_COMPAT", "1") == "0"
print("torch compat for torchtitan: " + ("not needed" if not need else
      ("OFF (TT_TORCH_COMPAT=0), missing: " if off else "adds ") + ", ".join("torch." + n for n in need)))
PY
    if grep -q STAND-IN "$CARRY/README.txt"; then
        note "c4_test: a stand-in data set (.gpu_carry/README.txt): losses are not torchtitan's reference losses"
    fi
}

pack() {  # the logs into one file
    (cd "$WORK" && find . -maxdepth 2 | sort >listing.txt &&
        find . -maxdepth 2 \( -name '*.log' -o -name log -o -name train.py -o -name '*.console' -o -name listing.txt \) -print0 |
        tar -czf "$OUT/integrations/logs.tar.gz" --null -T -) || true
}

part() {  # part NAME SECONDS_PER_RUN
    local name=$1 limit=$2 rc t0=$SECONDS
    note ""
    if [ "$limit" -lt 30 ]; then
        note "== $name: skipped: out of time ($(left) s left)"
        return 0
    fi
    echo "===== $name (each run at most $limit s)"
    set +e
    OUT=$WORK PARTS=$name RUN_TIMEOUT=$limit bash bench/integrations_gpu.sh 2>&1 | tee "$WORK/$name.console"
    rc=${PIPESTATUS[0]}
    set -e
    note "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (time limit)')"
    [ "$rc" = 0 ] || FAILED=1
    if [ "$name" = torchtitan ]; then
        plain "$WORK/$name.console" | sed -n '/^-- a: losses and memory/,/^== docs examples/p' |
            grep -v '^== docs examples' | tee -a "$SUMMARY" || true
        local a b
        a=$(plain "$WORK/tt_a.log" 2>/dev/null | grep -oE "step: *[0-9]+ +loss: *[-0-9.e+]+" | awk '$2 > 10') || true
        b=$(plain "$WORK/tt_b.log" 2>/dev/null | grep -oE "step: *[0-9]+ +loss: *[-0-9.e+]+" | awk '$2 > 10') || true
        if [ -n "$a" ] && [ "$a" = "$b" ]; then
            note "A vs B (resumed at 10), steps 11-20: identical ($(echo "$a" | wc -l) steps)"
        else
            note "A vs B (resumed at 10), steps 11-20: DIFFER or missing"
            diff <(echo "$a") <(echo "$b") | tee -a "$SUMMARY" || true
        fi
    else
        plain "$WORK/$name.console" | grep -E "^$name: " | tee -a "$SUMMARY" || true
        plain "$WORK/example_$name/log" 2>/dev/null |
            grep -E "loss|rror|Traceback|Killed|memory" | tail -12 | tee -a "$SUMMARY" || true
        note "written: $(find "$WORK/example_$name" -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null)"
    fi
    if [ "$rc" != 0 ]; then
        note "-- last lines:"
        plain "$WORK/$name.console" | tail -25 | tee -a "$SUMMARY" || true
    fi
    pack
}

main() {
    versions
    local ok=1
    if python3 -c 'import torchtitan.train' 2>"$WORK/tt_import.log"; then
        note "torchtitan.train: imports"
    else
        note "torchtitan.train: does not import:"
        tail -5 "$WORK/tt_import.log" | tee -a "$SUMMARY"
        ok=0
    fi
    for name in accelerate hf-trainer lightning; do
        part "$name" "$(( $(left) - 10 < 100 ? $(left) - 10 : 100 ))"
    done
    if [ "$ok" = 1 ]; then
        part torchtitan "$(( ($(left) - 15) / 3 < 200 ? ($(left) - 15) / 3 : 200 ))"
    else
        note "== torchtitan: skipped: torchtitan.train does not import"
        FAILED=1
    fi
    pack
    echo
    echo "===== summary ($OUT/summary.txt)"
    cat "$SUMMARY"
    [ "$FAILED" = 0 ]
}

SECONDS=0
FAILED=0
mkdir -p "$WORK"
: >"$SUMMARY"
set -o pipefail
{ note "== bench/integrations_gpu_device.sh, $(date -u +%FT%TZ)"; install; main; } 2>&1 | tee -a "$OUT/integrations/console.log"
