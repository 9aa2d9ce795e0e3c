#!/usr/bin/env bash
# Launch the trainer with the DeepSpeed launcher (`deepspeed`), for engine.name=zero1/zero2/zero3.
#
#   bash launch/deepspeed.sh                                       # ZeRO-2 on 2 local ranks (CPU or GPU)
#   CONFIG=configs/cpu_zero3.yaml bash launch/deepspeed.sh
#   HOSTFILE=launch/hostfile.example NUM_NODES=2 MASTER_ADDR=node001 \
#       CONFIG=configs/gpt1b_zero3.yaml bash launch/deepspeed.sh   # multi-node over pdsh/ssh
#
# The hostfile lists one host per line with its GPU count ("node001 slots=8"); see
# launch/hostfile.example. Without HOSTFILE the job runs on this machine only. The trainer maps
# the launcher's RANK/LOCAL_RANK/WORLD_SIZE through flashoptim_dist/launch_env.py and calls
# flashoptim_dist.deepspeed.initialize with the JSON named by engine.deepspeed_config.
#
# Settings (environment variables, all optional):
#   CONFIG          trainer config file                  (configs/cpu_zero2.yaml)
#   COMMAND         train | compare                      (train)
#   NUM_GPUS        ranks per node                       (GPUs on this node, or 2 without GPUs)
#   HOSTFILE        DeepSpeed/MPI-style hostfile         (none: this machine)
#   NUM_NODES       nodes to use from the hostfile       (all)
#   MASTER_ADDR     address of node 0 (pin it: the default guess from `hostname -I` can be wrong)
#                                                       (127.0.0.1 without HOSTFILE)
#   MASTER_PORT     rendezvous port                      (29500)
#   DS_LAUNCHER     multi-node backend: pdsh, openmpi, slurm, ...   (pdsh)
#   DS_ACCELERATOR  DeepSpeed accelerator                (cpu when no GPU is visible)
#   DEEPSPEED       the launcher binary                  (deepspeed)
#   DEEPSPEED_ARGS  extra launcher arguments             (none)
# Arguments are passed to the trainer as config overrides.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

CONFIG="${CONFIG:-$repo/configs/cpu_zero2.yaml}"
COMMAND="${COMMAND:-train}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
DS_LAUNCHER="${DS_LAUNCHER:-pdsh}"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$gpus" == "0" ]]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
NUM_GPUS="${NUM_GPUS:-$([[ "$gpus" == "0" ]] && echo 2 || echo "$gpus")}"

args=(--num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank --module)
if [[ -n "${HOSTFILE:-}" ]]; then
    args=(--hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" "${args[@]}")
    if [[ -n "${NUM_NODES:-}" ]]; then args=(--num_nodes "$NUM_NODES" "${args[@]}"); fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then args=(--master_addr "$MASTER_ADDR" "${args[@]}"); fi
else
    args=(--master_addr "${MASTER_ADDR:-127.0.0.1}" "${args[@]}")
fi
read -r -a extra <<< "${DEEPSPEED_ARGS:-}"

set -x
exec "$DEEPSPEED" "${extra[@]}" "${args[@]}" flashoptim_dist.train "$COMMAND" --config "$CONFIG" "$@"
