#!/usr/bin/env bash
# The foundation's GPU check: the quickstart and the 1.2B dense config through the real CLI on
# one H100, records copied to $OUT. Run on the device machine from the project root, with the
# ml_collections wheel from ../shared/device/wheels.sh in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/ml_collections-*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv | tee "$OUT/gpu.txt"
run() {  # name, then CLI args; checkpoints stay in /tmp (a 1.2B run's are ~14 GB)
  local name=$1; shift
  local wd=/tmp/runs/$name; rm -rf "$wd"
  /usr/bin/time -f "$name wall_s %e" python3 -m experiments.main --workdir="$wd" "$@" \
    > "$OUT/$name.log" 2>&1; echo "$name exit $?" | tee -a "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log"
  cp "$wd/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null
  cp "$wd/train_log.jsonl" "$OUT/$name.train_log.jsonl" 2>/dev/null
}
run quickstart --config=configs/quickstart.py
run llama_1b --config=configs/llama_1b.py --config.train.steps=40 --config.train.warmup_steps=10 \
  --config.train.eval_every=0 --config.train.eval_batches=2 --config.train.checkpoint_every=20 \
  --config.train.timing_warmup_steps=5
run llama_1b_full_remat_accum2 --config=configs/llama_1b.py --config.model.remat=full \
  --config.train.global_batch_size=8 --config.train.grad_accum_steps=2 --config.train.steps=20 \
  --config.train.warmup_steps=5 --config.train.eval_every=0 --config.train.eval_batches=1 \
  --config.train.checkpoint_every=0 --config.train.timing_warmup_steps=3
