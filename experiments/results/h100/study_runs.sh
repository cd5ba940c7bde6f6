#!/usr/bin/env bash
# Short runs of the study configs through the CLI on one H100, for their records (model.attention
# and the moe section on a GPU, the default grouped matmul in a real run). Not converged runs.
set -x
common=(--config.train.steps=20 --config.train.warmup_steps=5 --config.train.eval_every=0
        --config.train.eval_batches=1 --config.train.checkpoint_every=0
        --config.train.timing_warmup_steps=3)
timeout 200 python -m experiments.main --config=configs/moe_16b.py:1gpu "${common[@]}" \
  --workdir=/tmp/runs/moe_16b_1gpu
timeout 150 python -m experiments.main --config=configs/attention_mla.py "${common[@]}" \
  --config.train.global_batch_size=4 --workdir=/tmp/runs/attention_mla
timeout 150 python -m experiments.main --config=configs/attention_gqa.py "${common[@]}" \
  --config.train.global_batch_size=4 --workdir=/tmp/runs/attention_gqa
for r in moe_16b_1gpu attention_mla attention_gqa; do
  cp /tmp/runs/$r/results.jsonl "$OUT/$r.results.jsonl" 2>/dev/null
done
