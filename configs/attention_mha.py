"""Attention study: MHA, 12 query heads each with its own K/V head (+110M parameters and 6x the
GQA KV cache: the cost of not sharing). Presets: `:smoke`."""

from configs import qwen_1p5b


def get_config(preset=None):
  c = qwen_1p5b.get_config(preset)
  c.model.attention = 'mha'
  c.model.num_kv_heads = None  # = num_heads
  return c
