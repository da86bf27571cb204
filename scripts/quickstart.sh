#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then `packrat demo`: archive ResNet-50 (random
# weights, built from code), serve it under Packrat (profiling a small grid, cached), drive a
# load whose concurrency changes, show the reconfigurations and the latency against the
# baseline, print a summary and stop everything. Outputs go to out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/packrat demo "$@"
