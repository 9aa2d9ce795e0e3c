#!/usr/bin/env bash
# Creates (or reuses) the virtualenv $VENV (default .venv) with the CPU build of torch 2.13,
# triton, DeepSpeed (pure-Python build), the test/train extras (with the pinned frameworks of
# docs/integrations.md: transformers, accelerate, lightning, torchtitan), ruff (the linter
# tests/run.sh runs) and this package (editable).
# Used by tests/run.sh (the test command) and launch/demo.sh (the CPU demo). Idempotent.
# On a GPU machine install torch for your CUDA version yourself and `pip install -e .[train]`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch first and pinned: the CPU wheel of 2.13.0 (an unpinned torch would pull a CUDA build);
# a torch already in the venv (e.g. a CUDA build you chose) is kept
if ! python -c "import torch" >/dev/null 2>&1; then
    pip install -q "torch==2.13.0"
fi
pip install -q numpy
DS_BUILD_OPS=0 pip install -q "deepspeed==0.19.8"
# the test extra pins the frameworks of docs/integrations.md: transformers, accelerate,
# lightning, torchtitan (torchtitan needs Python >= 3.11 and is skipped below that)
pip install -q -e ".[test,train]"
# the linter, pinned so that a new release cannot fail the tests with new findings (ruff.toml)
pip install -q "ruff==0.17.6"
if command -v mpicc >/dev/null 2>&1; then pip install -q mpi4py; fi
