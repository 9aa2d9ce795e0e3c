#!/usr/bin/env bash
# Launch the trainer with Open MPI's mpirun or MPICH's mpiexec (Hydra): one MPI process per rank,
# mapped to torch.distributed by flashoptim_dist/launch_env.py. MPI is only the launcher; the
# collectives run on NCCL (GPU) or gloo (CPU).
#
#   bash launch/mpirun.sh                                # the CPU demo, 2 ranks on this machine
#   HOSTFILE=hosts CONFIG=configs/gpt1b_fsdp2.yaml bash launch/mpirun.sh   # every slot of hosts
#   MPIRUN=mpiexec.hydra PYTHON=/path/to/mpich-venv/bin/python bash launch/mpirun.sh   # MPICH
#
# Which MPI: `$MPIRUN --version` says. Hydra (MPICH, Intel MPI) gets its own flags: -n, -f HOSTFILE
# (Hydra's "node001:8" lines), -genv NAME VALUE; Open MPI gets -np, --hostfile, -x NAME=VALUE.
# PYTHON's mpi4py must be built against that same MPI (see docs/launching.md).
#
# Nothing to hand-set on many nodes: with mpi4py importable (it is in .venv and the Docker image),
# every rank calls flashoptim_dist.launch_env.resolve(), where MPI itself splits the ranks by node
# (local rank/size) and rank 0 picks its address (the interface that routes to the other nodes;
# FLASHOPTIM_MASTER_IFNAME=ib0 names one) and a free port and broadcasts them. MASTER_ADDR /
# MASTER_PORT, when you set them, win and are passed to every rank. Without mpi4py this script
# pins MASTER_ADDR itself (the first host of HOSTFILE, else 127.0.0.1) and MASTER_PORT (29500).
#
# Settings (environment variables, all optional):
#   CONFIG        trainer config file                          (configs/cpu_demo.yaml)
#   COMMAND       train | compare                              (train)
#   NP            number of ranks        (with HOSTFILE: every slot in it; else GPUs here, or 2)
#   HOSTFILE      hostfile: Open MPI's "node001 slots=8" lines, Hydra's "node001:8"  (none: this machine)
#   MASTER_ADDR   host of rank 0, reachable from every rank    (discovered; see above)
#   MASTER_PORT   rendezvous port                              (discovered: a free port of rank 0)
#   FLASHOPTIM_MASTER_IFNAME  interface whose address rank 0 advertises (the routed one)
#   FLASHOPTIM_RDZV_TIMEOUT   seconds to wait for every rank at the rendezvous (600)
#   PYTHON        python interpreter on every host             (python3, or python if absent)
#   MPIRUN        the mpirun binary: Open MPI's, or MPICH's mpiexec.hydra / mpiexec.mpich   (mpirun)
#   MPIRUN_ARGS   extra mpirun arguments  (Open MPI: --oversubscribe; add e.g. --mca btl_tcp_if_include eth0.
#                 Hydra: none; e.g. -iface eth0)
# Arguments are passed to the trainer as config overrides.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

CONFIG="${CONFIG:-$repo/configs/cpu_demo.yaml}"
COMMAND="${COMMAND:-train}"
MPIRUN="${MPIRUN:-mpirun}"
# (the whole output first: `| grep -q` would close the pipe early, and pipefail then sees SIGPIPE)
mpirun_version="$("$MPIRUN" --version 2>&1 || true)"
if [[ "$mpirun_version" == *"HYDRA build details"* ]]; then flavor=hydra; else flavor=openmpi; fi
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
if [[ -z "${NP:-}" && -z "${HOSTFILE:-}" ]]; then
    NP="$("$PYTHON" -c 'import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; print(n or 2)')"
fi
if ! "$PYTHON" -c 'import mpi4py' >/dev/null 2>&1; then
    # No discovery without mpi4py: pin the rendezvous here, as before it existed.
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        if [[ -n "${HOSTFILE:-}" ]]; then
            MASTER_ADDR="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
            if [[ "$flavor" == hydra ]]; then MASTER_ADDR="${MASTER_ADDR%:*}"; fi  # node001:8
        else
            MASTER_ADDR=127.0.0.1
        fi
    fi
    MASTER_PORT="${MASTER_PORT:-29500}"
fi

# Every rank needs the same Python environment (and the rendezvous, where it is pinned).
pass_vars=(MASTER_ADDR MASTER_PORT FLASHOPTIM_MASTER_IFNAME FLASHOPTIM_RDZV_TIMEOUT PYTHONPATH VIRTUAL_ENV
           LD_LIBRARY_PATH NCCL_DEBUG NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME OMP_NUM_THREADS)
if [[ "$flavor" == hydra ]]; then
    # Hydra fills each host's slots in order (as --map-by slot) and binds nothing unless asked;
    # it runs as root without a flag and oversubscribes freely.
    args=(-bind-to none)
    if [[ -n "${NP:-}" ]]; then args+=(-n "$NP"); fi
    if [[ -n "${HOSTFILE:-}" ]]; then args+=(-f "$HOSTFILE"); fi
    read -r -a extra <<< "${MPIRUN_ARGS:-}"
    args+=(${extra[@]+"${extra[@]}"} -genv PATH "$PATH")
    for var in "${pass_vars[@]}"; do
        if [[ -n "${!var:-}" ]]; then args+=(-genv "$var" "${!var}"); fi
    done
else
    args=(--bind-to none --map-by slot)
    if [[ -n "${NP:-}" ]]; then args+=(-np "$NP"); fi
    if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
    if [[ "$(id -u)" == "0" ]]; then args+=(--allow-run-as-root); fi
    read -r -a extra <<< "${MPIRUN_ARGS:---oversubscribe}"
    args+=("${extra[@]}")
    args+=(-x PATH)
    for var in "${pass_vars[@]}"; do
        if [[ -n "${!var:-}" ]]; then args+=(-x "$var=${!var}"); fi
    done
fi

set -x
exec "$MPIRUN" "${args[@]}" "$PYTHON" -m flashoptim_dist.train "$COMMAND" --config "$CONFIG" "$@"
