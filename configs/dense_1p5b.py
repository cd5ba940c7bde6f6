"""MoE study, dense baseline: the 1.5B Qwen2.5-shaped model (1.31B with the byte tokenizer).

The same model as `attention_gqa.py`. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  return qwen2p5.get_config(preset, size='1.5b')
