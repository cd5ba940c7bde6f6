"""Attention study: MQA, all 12 query heads share one K/V head (half of GQA's KV cache).
Presets: `:smoke`."""

from configs import qwen_1p5b


def get_config(preset=None):
  c = qwen_1p5b.get_config(preset)
  c.model.attention = 'mqa'
  c.model.num_kv_heads = 1
  return c
