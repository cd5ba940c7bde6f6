#!/usr/bin/env bash
# One attention layer per variant at the study's 1.5B shape, bf16, forward and forward+backward
# at 4k and 16k tokens, cuDNN and XLA (NSA: XLA). Run from the repository root on the device.
set -x
python -m experiments.bench_attention --seq_lens=4096,16384 --impls=cudnn,xla --repeats=5 \
  --out="$OUT/bench_attention.json"
