#!/usr/bin/env bash
# The main job on a fresh machine, in one command: sets up .venv (CPU torch; see
# .ci/setup_python.sh), then trains the CPU demo — a tiny GPT on 2 CPU ranks with FSDP2 and
# FlashAdamW on a byte-level corpus of this machine's Python standard library — and prints the
# bytes-per-parameter summary. Arguments are config overrides, e.g. `train.steps=50`.
#   CONFIG   trainer config (configs/cpu_demo.yaml)      COMMAND  train | compare (train)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/.ci/setup_python.sh"
# shellcheck disable=SC1091
. "${VENV:-$repo/.venv}/bin/activate"
exec flashoptim-dist "${COMMAND:-train}" --config "${CONFIG:-$repo/configs/cpu_demo.yaml}" "$@"
