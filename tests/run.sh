#!/usr/bin/env bash
# The project's test command (README "Run the tests"). On a fresh machine it installs everything
# the tests need — Debian packages (Open MPI, SLURM, munge: .ci/setup_system.sh) and a virtualenv
# with torch 2.13 (CPU), triton, DeepSpeed, ruff and this package (.ci/setup_python.sh) — then
# lints (ruff, rules in ruff.toml; a finding fails the run) and runs pytest. Environment: VENV
# (default .venv), SKIP_SYSTEM_SETUP=1 to skip apt; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SYSTEM_SETUP:-0}" != 1 ]; then
    bash .ci/setup_system.sh
fi
bash .ci/setup_python.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export PYTHONUNBUFFERED=1
# lint first: seconds, and a finding fails the run before the long test suite starts
ruff check flashoptim_dist tests bench
# everything optional was installed above: a missing piece is a failure, not a skip
# (tests/optional_deps.py); without the system setup SLURM may legitimately be absent
if [ "${SKIP_SYSTEM_SETUP:-0}" != 1 ]; then
    export FLASHOPTIM_REQUIRE_OPTIONAL="${FLASHOPTIM_REQUIRE_OPTIONAL:-1}"
fi
exec python -m pytest -q tests "$@"
