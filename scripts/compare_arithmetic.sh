#!/usr/bin/env bash
# MetaTuner-J vs zero-shot vs static LoRA SFT on the built-in arithmetic task, one protocol:
# the same 400 training items, batch 4, the same number of optimizer steps (STEPS), the same
# learning rate for the LoRA-writing parts, scored on the first 200 test items.
# Usage: scripts/compare_arithmetic.sh [STEPS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-20}
OUT=${2:-results/arithmetic}
COMMON=(--task arithmetic --limit 200 data.train_limit=400 train.batch_size=4 "train.steps=$STEPS"
        train.lr_static=1e-3 train.lr_hypernet=1e-3 train.lr_encoder=3e-4 train.lr_decoder=3e-4)
mt=.venv/bin/metatuner
[ -f "$OUT/zero-shot/summary.json" ] || $mt eval --method zero-shot "${COMMON[@]}" --out "$OUT/zero-shot"
[ -f "$OUT/sft/summary.json" ] || $mt eval --method sft "${COMMON[@]}" --out "$OUT/sft"
[ -f "$OUT/metatuner-j/eval-test/summary.json" ] || $mt train --config quick "${COMMON[@]}" \
  train.save_every=5 train.sync_every=5 --out "$OUT/metatuner-j"
# the same MetaTuner-J run with the prompt branch off (w/o P): isolates the per-query LoRA
[ -f "$OUT/metatuner-j-wo-p/eval-test/summary.json" ] || $mt train --config quick "${COMMON[@]}" \
  train.save_every=5 train.sync_every=5 train.ablation=no_prompt --out "$OUT/metatuner-j-wo-p"
.venv/bin/python scripts/summarize_results.py "$OUT"
