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
if ! command -v java >/dev/null 2>&1; then
  echo "setup: TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2
fi
echo "setup: ready; activate with: . .venv/bin/activate" >&2
