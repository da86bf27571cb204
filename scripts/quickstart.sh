#!/usr/bin/env bash
# The main job on a fresh machine: set up, archive ResNet-50 (random weights, built from
# code), profile it on this machine's cores (cached), and print its plans with their
# predicted speedup over one all-cores instance. Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p out
[ -f out/resnet50.mar ] || packrat archive --zoo resnet50 --out out
packrat profile out/resnet50.mar --max-batch 8 --out out/resnet50.csv --plot out/resnet50.png
packrat plan --profile out/resnet50.csv --batch 1,2,4,8
