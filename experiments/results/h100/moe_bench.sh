#!/usr/bin/env bash
# MoE on one H100: training-step time and memory of moe_16b:1gpu (DeepSeek-V2-Lite layers, 4 of
# them) per dispatch strategy and grouped matmul; then the grouped-matmul kernels alone at the
# DeepSeek-V2-Lite expert shape. Run from the repository root on the device.
set -x
python -m experiments.bench_moe_dispatch --config=configs/moe_16b.py:1gpu --steps=12 \
  --variants=dropless:ragged_dot,dropless:tokamax,dropless:triton,capacity,dense \
  --out="$OUT/bench_moe_dispatch.json"
python -m experiments.bench_moe_gmm --shapes=deepseek_v2_lite --repeats=10 \
  --out="$OUT/bench_moe_gmm_v2_lite.json"
