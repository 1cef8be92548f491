#!/usr/bin/env bash
# One prepared GPU check (issue #28): scripts/gpu_check.sh OUT_DIR [--mnist DIR]
# [--budget-s 480] [--rehearse-on-cpu]. What it checks and writes: scripts/gpu_check.py.
# Without a CUDA GPU it says so in one line and exits 0. Uses .venv when there is one,
# else the python3 on PATH (a GPU box's own torch; see the README's GPU install).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
