#!/usr/bin/env bash
# Issue 6's H100 check of the Mosaic GPU (Hopper) grouped matmuls, in three stages that each
# fit one 10-minute device call: `bash experiments/results/h100/moe_gmm_mosaic.sh STAGE`, after
# the wheels' install line (../shared/device/wheels.sh; tokamax is among them). NOT YET RUN:
# no GPU was lent to the sessions that wrote these kernels (README.md beside this file).
#   1: DeepSeek-V2-Lite, even groups: dense, every Triton and every Mosaic candidate tiling
#   2: DeepSeek-V2-Lite, skewed groups: dense, every Mosaic tiling, the autotuner's choice
#   3: Mixtral and DeepSeek-V3, both distributions: dense, Mosaic defaults, the autotuner
# Every variant is checked against a per-group reference (output and both gradients) before
# it is timed; a kernel that fails or is wrong becomes an error row, the others still run.
set -x
export EFFICIENTJAX_CACHE_DIR="$OUT/autotune"  # the autotuner's choices come back with the run
bench="python -m experiments.bench_moe_gmm --repeats=20"
case "$1" in
  1) $bench --shapes=deepseek_v2_lite --groups=even --impls=dense,triton,mosaic_gpu \
       --out="$OUT/bench_moe_gmm_mosaic_v2_lite_even.json" ;;
  2) $bench --shapes=deepseek_v2_lite --groups=skewed --impls=dense,mosaic_gpu,autotuned \
       --out="$OUT/bench_moe_gmm_mosaic_v2_lite_skewed.json" ;;
  3) $bench --shapes=mixtral_8x7b,deepseek_v3 --impls=dense,mosaic_gpu,autotuned --tilings=0 \
       --out="$OUT/bench_moe_gmm_mosaic_mixtral_v3.json" ;;
  *) echo "usage: $0 1|2|3" >&2; exit 2 ;;
esac
