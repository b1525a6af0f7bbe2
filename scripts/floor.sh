#!/usr/bin/env bash
# The floor every method is compared against: zero-shot and CoT of the default model on the first
# N test items of each benchmark, one protocol for all. Usage: scripts/floor.sh [N] [DATA_DIR] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
DATA=${2:-../shared/data}
OUT=${3:-results/floor}
for task in gsm8k math hotpotqa cosmosqa; do
  for method in zero-shot cot; do
    [ -f "$OUT/$method-$task/summary.json" ] && continue
    .venv/bin/metatuner eval --task "$task" --method "$method" --limit "$N" --data-dir "$DATA" \
      --out "$OUT/$method-$task"
  done
done
.venv/bin/python scripts/summarize_results.py "$OUT"
