#!/usr/bin/env bash
# End-to-end benchmark of zoo models on this machine through a real TorchServe, one model at a
# time (each takes 10+ minutes on 2 cores; run nothing else heavy meanwhile).
#   MODELS="resnet50 bert-base gpt2" BATCH=1,2,4,8,16 OUT=bench-out bash scripts/bench_e2e.sh
# Writes OUT/MODEL/{bench.json,bench.png,table.txt,progress.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
BATCH=${BATCH:-1,2,4,8,16}
MODELS=${MODELS:-resnet50 bert-base gpt2}
for m in $MODELS; do
  mkdir -p "$OUT/$m"
  start=$(date +%s)
  .venv/bin/python -m packrat.cli bench --zoo "$m" --batch "$BATCH" --out "$OUT/$m" \
    --plot "$OUT/$m/bench.png" 2> "$OUT/$m/progress.log" | tee "$OUT/$m/table.txt"
  echo "$m: wall $(( $(date +%s) - start )) s" | tee -a "$OUT/$m/table.txt"
done
