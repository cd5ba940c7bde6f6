"""Inference study point: int4 weight-only, AWQ-calibrated groups of 128 input features
with zero points (AWQ's default), packed two per byte, compute in bf16.

Everything else is configs/infer_bf16.py's (Llama-3.2-1B's shape, the same workload, quality
against bf16 on the same held-out tokens). Presets: `:smoke` (CPU, seconds), `:quickstart`
(serve the quick start's run).
"""

from configs import infer_bf16

PRESETS = ('smoke', 'quickstart')  # --help lists them; no preset is the full size


def get_config(preset=None):
  # AWQ's own default (AutoAWQ: zero_point=True): a zero point per group.
  return infer_bf16.study_point('int4', preset, quant_method='awq', symmetric=False)
