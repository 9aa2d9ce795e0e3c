#!/usr/bin/env bash
# Run a distributed benchmark with one process group per case, so that no case inherits another
# case's allocator state, NCCL buffers or leaked engines. In-process case order changed
# iteration times by up to 30% on 2×H200 (docs/PERFORMANCE.md); the numbers of record use this.
#
#   bash bench/run_isolated.sh bench/dist.py torch_adamw,flash,flash_release [extra args...]
#   NPROC=2 bash bench/run_isolated.sh bench/deepspeed_bench.py ds_default,ds_bf16,flash --stages 3
#
# Environment: NPROC (processes per case, default 2), TORCHRUN (default "torchrun").
set -euo pipefail
script=${1:?usage: run_isolated.sh SCRIPT CASE[,CASE...] [ARGS...]}
cases=${2:?usage: run_isolated.sh SCRIPT CASE[,CASE...] [ARGS...]}
shift 2
IFS=, read -r -a list <<<"$cases"
for c in "${list[@]}"; do
    ${TORCHRUN:-torchrun} --nproc_per_node "${NPROC:-2}" "$script" --cases "$c" "$@"
done
