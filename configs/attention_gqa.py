"""Attention study: GQA, 12 query heads sharing 2 K/V heads (Qwen2.5's own choice; the
baseline the other variants are sized against). Presets: `:smoke`."""

from configs import qwen_1p5b


def get_config(preset=None):
  c = qwen_1p5b.get_config(preset)
  c.model.attention = 'gqa'
  c.model.num_kv_heads = 2
  return c
