"""Attention study, MHA: 12 query heads, each with its own K/V head, at the 1.5B shape.

+110M parameters and 6x the GQA KV cache: the cost of not sharing. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='1.5b')
  c.model.attention = 'mha'
  c.model.num_kv_heads = None  # = num_heads
  return c
