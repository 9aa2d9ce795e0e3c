#!/usr/bin/env bash
# The project's test command (README "Run the tests"). On a fresh machine it installs everything
# the tests need — Debian packages (Open MPI, SLURM, munge), a virtualenv with the CPU build of
# torch, triton, DeepSpeed (pure-Python build) and this package — then runs pytest.
# Environment: VENV (default .venv), SKIP_SYSTEM_SETUP=1 to skip apt, extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ "${SKIP_SYSTEM_SETUP:-0}" != 1 ] && [ -f .ci/setup_system.sh ]; then
    bash .ci/setup_system.sh
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch first and pinned: the CPU wheel of 2.13.0 (an unpinned torch would pull a CUDA build)
pip install -q "torch==2.13.0" numpy
DS_BUILD_OPS=0 pip install -q "deepspeed==0.19.8"
pip install -q -e ".[test,train]"
if command -v mpicc >/dev/null 2>&1; then pip install -q mpi4py; fi

export PYTHONUNBUFFERED=1
exec python -m pytest -q tests "$@"
