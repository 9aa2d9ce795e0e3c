#!/usr/bin/env bash
# Install the system packages the trainer/launcher tests need, idempotently (Debian/Ubuntu, root):
#   Open MPI (mpirun tests), SLURM + munge (the local one-node cluster of tests/slurm_cluster.py).
# Safe to run again: it installs only what is missing, and makes sure munge has a key.
#   bash .ci/setup_system.sh
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev slurm-wlm munge)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ "$(id -u)" != "0" ]]; then
        echo "setup_system.sh: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup_system.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "setup_system.sh: ${packages[*]} already installed"
fi

# The munge package creates its key on install; create one if it is missing (e.g. a trimmed image).
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
