"""Attention study, GQA: 12 query heads sharing 2 K/V heads, at the 1.5B Qwen2.5 shape.

Qwen2.5's own choice, and the baseline the other variants are sized against. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='1.5b')
  c.model.attention = 'gqa'
  c.model.num_kv_heads = 2
  return c
