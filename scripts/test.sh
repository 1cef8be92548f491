#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest.
#   ./scripts/test.sh            default suite (skips tests marked slow; cuda tests skip without a GPU)
#   ./scripts/test.sh --slow     everything, including the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

args=()
for a in "$@"; do
    if [ "$a" = "--slow" ]; then args+=(-m "slow or not slow"); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest "${args[@]}"
