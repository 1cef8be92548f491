#!/usr/bin/env bash
# Verify the dependency floors: install the project into .venv-floors with every direct
# dependency at exactly its floor (scripts/floors.txt), check that the floors file and
# pyproject.toml agree, and run the test suite there. Extra arguments go to pytest.
#   ./scripts/check_floors.sh            the default suite (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
python3 - <<'PY'
import re, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = meta["dependencies"] + [d for extra in meta["optional-dependencies"].values() for d in extra]
floors = {re.split(r"[\[>=<]", d)[0].lower(): d.split(">=")[1].split(",")[0]
          for d in deps if ">=" in d}
pinned = dict(line.split("==") for line in open("scripts/floors.txt")
              if line.strip() and not line.startswith("#"))
pinned = {k.lower(): v.strip() for k, v in pinned.items()}
wrong = {k: (v, pinned.get(k)) for k, v in floors.items() if pinned.get(k) != v}
if wrong:
    raise SystemExit(f"scripts/floors.txt disagrees with pyproject.toml: {wrong}")
print(f"floors: {len(floors)} direct dependencies pinned at their floors")
PY
if [ ! -x .venv-floors/bin/python ]; then
    "$PYTHON" -m venv .venv-floors
fi
.venv-floors/bin/python -m pip install --quiet --upgrade pip
.venv-floors/bin/python -m pip install --quiet -c scripts/floors.txt ".[dev]"
.venv-floors/bin/python -m pip list 2>/dev/null | grep -i -E "^($(sed -n 's/==.*//p' scripts/floors.txt | grep -v '^#' | paste -sd'|'))[[:space:]]"
exec .venv-floors/bin/python -m pytest -p no:cacheprovider "$@"
