#!/usr/bin/env bash
# The metrics issue on one H100: the quickstart and configs/llama_1b.py through the CLI with
# profiling on (records + trace summaries), and the sampler's cost (experiments/bench_sampler.py)
# on llama_1b. Results in $OUT. Run from the project root with .whl/ml_collections-*.whl.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/ml_collections-*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; rm -rf /tmp/runs
run() {  # name, then CLI args
  local name=$1; shift
  python3 -m experiments.main --workdir=/tmp/runs/$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/$name.log"
  cp /tmp/runs/$name/results.jsonl "$OUT/$name.results.jsonl"
}
run quickstart --config=configs/quickstart.py --config.profile.steps=5
run llama_1b --config=configs/llama_1b.py --config.train.steps=60 --config.train.warmup_steps=10 \
  --config.train.eval_every=0 --config.train.eval_batches=2 --config.train.checkpoint_every=0 \
  --config.train.timing_warmup_steps=5 --config.profile.steps=3
python3 -m experiments.bench_sampler --config=configs/llama_1b.py --blocks=4 --steps_per_block=10 \
  --out="$OUT/bench_sampler_llama_1b.json" > "$OUT/bench_sampler.log" 2>&1; echo "bench exit $?"
python3 - "$OUT" <<'PY'
import json, sys
for name in ('quickstart', 'llama_1b'):
  r = json.loads(open(f'{sys.argv[1]}/{name}.results.jsonl').readline())['metrics']
  t = r['trace']
  cats = sum(t['categories_ms'].values()) if t.get('available') else None
  print(name, 'tok/s %.0f' % r['throughput']['tokens_per_s'], 'mfu %.3f / %.3f' % (
      r['compute']['mfu_analytic'] or -1, r['compute']['mfu_compiler'] or -1),
      'J/token', r['energy']['joules_per_token'], 'W', r['energy']['avg_power_w'],
      'amu', r['memory']['amu'], 'busy', t.get('busy_fraction'),
      'categories/busy', cats / t['busy_ms'] if cats else None, t.get('categories_share'))
PY
cat "$OUT/bench_sampler.log" | tail -20
