#!/usr/bin/env bash
# The five small studies on this 2-core CPU machine, then their reports; what this folder holds
# is copied from runs/studies/ (records, study.json, sweep.jsonl, logs) and reports/.
#   bash experiments/results/cpu/studies/run_all.sh [STUDY ...]
set -uo pipefail
cd "$(git rev-parse --show-toplevel)"
here=experiments/results/cpu/studies
studies=("$@")
[ ${#studies[@]} -eq 0 ] && studies=(attention_small positions_small moe_small execution_small finetune_small precisions_small)
for s in "${studies[@]}"; do
  start=$(date +%s)
  python -m experiments.sweep --study=configs/studies/$s.py --root=runs/studies 2>&1 \
    | grep -v 'xla_bridge' | tee runs/studies/$s.sweep.log
  echo "$s: $(( $(date +%s) - start )) s of wall time" | tee -a runs/studies/$s.sweep.log
  [ -d runs/studies/$s ] || { echo "$s: the sweep made no folder; stopping"; exit 1; }
  python -m experiments.report runs/studies/$s --out=$here/$s/report
  mkdir -p $here/$s/runs
  cp runs/studies/$s.sweep.log runs/studies/$s/study.json runs/studies/$s/sweep.jsonl $here/$s/
  # The records, in the study's layout (point/seed<k>/results.jsonl); checkpoints stay behind.
  (cd runs/studies/$s && find . -name results.jsonl -o -name failed.json) | while read -r f; do
    mkdir -p "$here/$s/runs/$(dirname "$f")" && cp "runs/studies/$s/$f" "$here/$s/runs/$f"
  done
done
