#!/usr/bin/env bash
# Launch the trainer with torchrun, on one node or many.
#
#   bash launch/torchrun.sh [section.key=value ...]            # the CPU demo on 2 local ranks
#   CONFIG=configs/gpt1b_fsdp2.yaml bash launch/torchrun.sh    # all GPUs of this node
#
# Multi-node: run the same command on every node with the same MASTER_ADDR (a host every node
# can reach, e.g. the first node), NNODES and RDZV_ID; torchrun's c10d rendezvous assigns ranks:
#   NNODES=4 MASTER_ADDR=node001 MASTER_PORT=29500 RDZV_ID=job42 bash launch/torchrun.sh
#
# Settings (environment variables, all optional):
#   CONFIG          trainer config file                      (configs/cpu_demo.yaml)
#   COMMAND         train | compare                          (train)
#   NPROC_PER_NODE  ranks per node                           (GPUs on this node, or 2 without GPUs)
#   NNODES          number of nodes                          (1)
#   MASTER_ADDR     rendezvous host for NNODES > 1           (127.0.0.1)
#   MASTER_PORT     rendezvous port for NNODES > 1           (29500)
#   RDZV_ID         rendezvous id, the same on every node    (flashoptim)
#   FLASHOPTIM_RDZV_TIMEOUT  seconds for all NNODES to join     (600, torchrun's default)
#   PYTHON          python interpreter                       (python3, or python if absent)
#   TORCHRUN_ARGS   extra arguments for torchrun             (none)
# Arguments are passed to the trainer as config overrides.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

CONFIG="${CONFIG:-$repo/configs/cpu_demo.yaml}"
COMMAND="${COMMAND:-train}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-flashoptim}"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; print(n or 2)')"
fi

read -r -a extra <<< "${TORCHRUN_ARGS:-}"
if [[ "$NNODES" == "1" ]]; then
    # --standalone: a private rendezvous on a free local port (several jobs may share a node).
    rdzv=(--standalone)
else
    join="${FLASHOPTIM_RDZV_TIMEOUT:-600}"
    join="${join%.*}"  # torchrun takes whole seconds
    rdzv=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
          --rdzv-conf="join_timeout=$((join > 0 ? join : 1))")
    # On a node that does not host the store, wait for it here: an unreachable MASTER_ADDR then
    # fails with the fix named instead of torchrun's connection traceback. Returns at once on
    # the node whose address MASTER_ADDR is (torchrun starts the store there).
    # (run as a file: importing the package would import torch, seconds per node for nothing)
    "$PYTHON" "$repo/flashoptim_dist/launch_env.py" --wait "$MASTER_ADDR:$MASTER_PORT"
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node="$NPROC_PER_NODE" "${extra[@]}" \
    -m flashoptim_dist.train "$COMMAND" --config "$CONFIG" "$@"
