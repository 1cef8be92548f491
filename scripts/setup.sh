#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its train + dev extras.
# Idempotent: a second run with an unchanged pyproject.toml returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.frozenfit-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# torch's build with CUDA makes the venv ~6 GB: say so before pip fails halfway with ENOSPC.
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "setup: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR == 2 {print $6}');" \
         "the venv needs about 8 GB (torch with CUDA); pip keeps no cache this time" >&2
    export PIP_NO_CACHE_DIR=1
fi
echo "setup: installing the project into .venv (first run takes a minute or two)"
.venv/bin/python -m pip install --quiet --upgrade pip
# Plain pip on purpose: it honours this machine's constraint file and local torch wheels.
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done"
