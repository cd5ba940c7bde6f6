"""Inference study point: fp16 weights and compute (bf16's 16-bit rival: range 6.5e4, so
activations may overflow where bf16's do not).

Everything else is configs/infer_bf16.py's (Llama-3.2-1B's shape, the same workload, quality
against bf16 on the same held-out tokens). Presets: `:smoke` (CPU, seconds), `:quickstart`
(serve the quick start's run).
"""

from configs import infer_bf16

PRESETS = ('smoke', 'quickstart')  # --help lists them; no preset is the full size


def get_config(preset=None):
  return infer_bf16.study_point('fp16', preset)
