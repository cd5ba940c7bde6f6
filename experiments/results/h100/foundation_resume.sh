#!/usr/bin/env bash
# On one H100: (1) the quickstart's record; (2) a run killed with SIGKILL after its step-10
# checkpoint and restarted in the same workdir, against the same run uninterrupted (an 8-layer
# cut of configs/llama_1b.py, bf16 + cuDNN). Everything is bundled in $OUT/foundation_resume.tar
# (the device tool returns only a few files). Run from the project root with
# .whl/ml_collections-*.whl present (../shared/device/wheels.sh).
# DETERMINISTIC=1: with XLA's deterministic GPU ops, and without the quickstart part; the
# bundle is then $OUT/foundation_resume_deterministic.tar.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/ml_collections-*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R=/tmp/res; rm -rf "$R" /tmp/runs; mkdir -p "$R"
NAME=foundation_resume
if [ "${DETERMINISTIC:-0}" = 1 ]; then
  export XLA_FLAGS=--xla_gpu_deterministic_ops=true; NAME=foundation_resume_deterministic
else
  python3 -m experiments.main --config=configs/quickstart.py --workdir=/tmp/runs/quickstart > "$R/quickstart.log" 2>&1
  echo "quickstart exit $?" >> "$R/quickstart.log"
  cp /tmp/runs/quickstart/results.jsonl "$R/quickstart.results.jsonl"
fi

ARGS=(--config=configs/llama_1b.py --config.model.num_layers=8 --config.train.steps=30
      --config.train.warmup_steps=5 --config.train.eval_every=0 --config.train.eval_batches=2
      --config.train.checkpoint_every=10 --config.train.timing_warmup_steps=3)
python3 -m experiments.main "${ARGS[@]}" --workdir=/tmp/runs/straight > "$R/straight.log" 2>&1
echo "straight exit $?" >> "$R/straight.log"
python3 -m experiments.main "${ARGS[@]}" --workdir=/tmp/runs/killed > "$R/killed.log" 2>&1 &
pid=$!
# Kill once the step-10 checkpoint is complete (orbax renames it into place when done) and a
# later step has run: a crash mid-run, not a clean stop.
until [ -d /tmp/runs/killed/checkpoints/10 ] && [ "$(wc -l < /tmp/runs/killed/train_log.jsonl)" -ge 13 ]; do
  sleep 0.05; kill -0 $pid 2>/dev/null || break
done
kill -9 $pid; wait $pid; echo "killed with SIGKILL after step $(wc -l < /tmp/runs/killed/train_log.jsonl)" | tee "$R/kill.txt"
python3 -m experiments.main "${ARGS[@]}" --workdir=/tmp/runs/killed > "$R/restarted.log" 2>&1
echo "restarted exit $?" >> "$R/restarted.log"
for w in straight killed; do
  cp /tmp/runs/$w/results.jsonl "$R/$w.results.jsonl"; cp /tmp/runs/$w/train_log.jsonl "$R/$w.train_log.jsonl"
done
python3 - "$R" <<'PY' | tee "$R/compare.txt"
import json, sys
r = sys.argv[1]
def log(n):  # the last entry per step wins: the restart re-runs the steps after the checkpoint
  return {d['step']: d['loss'] for d in map(json.loads, open(f'{r}/{n}.train_log.jsonl'))}
a, b = log('straight'), log('killed')
d = [abs(a[s] - b[s]) for s in range(11, 31)]
b10 = {d['step']: d['loss'] for d in list(map(json.loads, open(f'{r}/killed.train_log.jsonl')))[:10]}
print('steps 1-10 of two uninterrupted runs:', 'bitwise equal' if all(a[s] == b10[s] for s in b10)
      else 'differ')
print('steps 11-30 after the restart:', 'bitwise equal to the uninterrupted run' if max(d) == 0
      else f'max |loss diff| vs the uninterrupted run {max(d):.3g}')
PY
grep -h "exit\|resumed\|record" "$R"/*.log
tar -C "$R" -cf "$OUT/$NAME.tar" .
