#!/usr/bin/env bash
# Second MoE call (after the FLOP-count twin stopped lowering Pallas kernels for the CPU): the
# Triton grouped matmul inside the training step, and the kernels at the Mixtral shape.
set -x
python -m experiments.bench_moe_dispatch --config=configs/moe_16b.py:1gpu --steps=12 \
  --variants=dropless:triton --out="$OUT/bench_moe_dispatch_triton.json"
python -m experiments.bench_moe_gmm --shapes=mixtral_8x7b --tilings=0,2 --repeats=10 \
  --out="$OUT/bench_moe_gmm_mixtral.json"
