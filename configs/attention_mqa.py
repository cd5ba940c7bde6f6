"""Attention study, MQA: all 12 query heads share one K/V head, at the 1.5B shape.

Half of GQA's KV cache. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='1.5b')
  c.model.attention = 'mqa'
  c.model.num_kv_heads = 1
  return c
