#!/usr/bin/env bash
# Launch the trainer with Open MPI's mpirun: one MPI process per rank, mapped to torch.distributed
# by flashoptim_dist/launch_env.py (OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK -> RANK/WORLD_SIZE/
# LOCAL_RANK). MPI is only the launcher; the collectives run on NCCL (GPU) or gloo (CPU).
#
#   bash launch/mpirun.sh                               # the CPU demo, 2 ranks on this machine
#   NP=16 HOSTFILE=hosts MASTER_ADDR=node001 CONFIG=configs/gpt1b_fsdp2.yaml bash launch/mpirun.sh
#
# The rendezvous address is pinned explicitly (MASTER_ADDR, exported to every rank with -x)
# rather than discovered, because MPI-based discovery (e.g. DeepSpeed's, which takes the first
# address of `hostname -I`) often picks an interface the other ranks cannot reach.
#
# Settings (environment variables, all optional):
#   CONFIG        trainer config file                         (configs/cpu_demo.yaml)
#   COMMAND       train | compare                             (train)
#   NP            number of ranks                             (2)
#   HOSTFILE      Open MPI hostfile ("node001 slots=8" lines)  (none: this machine)
#   MASTER_ADDR   host of rank 0, reachable from every rank   (first host of HOSTFILE, else 127.0.0.1)
#   MASTER_PORT   rendezvous port                             (29500)
#   PYTHON        python interpreter on every host            (python3, or python if absent)
#   MPIRUN        the mpirun binary                           (mpirun)
#   MPIRUN_ARGS   extra mpirun arguments                      (--oversubscribe; add e.g. --mca btl_tcp_if_include eth0)
# Arguments are passed to the trainer as config overrides.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

CONFIG="${CONFIG:-$repo/configs/cpu_demo.yaml}"
COMMAND="${COMMAND:-train}"
NP="${NP:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
MPIRUN="${MPIRUN:-mpirun}"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ -n "${HOSTFILE:-}" ]]; then
        MASTER_ADDR="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
    else
        MASTER_ADDR=127.0.0.1
    fi
fi

args=(-np "$NP" --bind-to none --map-by slot)
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ "$(id -u)" == "0" ]]; then args+=(--allow-run-as-root); fi
read -r -a extra <<< "${MPIRUN_ARGS:---oversubscribe}"
args+=("${extra[@]}")
# Every rank needs the same rendezvous and the same Python environment.
args+=(-x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT" -x PATH)
for var in PYTHONPATH VIRTUAL_ENV LD_LIBRARY_PATH NCCL_DEBUG NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME OMP_NUM_THREADS; do
    if [[ -n "${!var:-}" ]]; then args+=(-x "$var"); fi
done

set -x
exec "$MPIRUN" "${args[@]}" "$PYTHON" -m flashoptim_dist.train "$COMMAND" --config "$CONFIG" "$@"
