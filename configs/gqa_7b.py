"""The 7B attention point with grouped-query attention: mla_7b.py's body, 8 K/V heads.

32 query heads of 128 share 8 K/V heads (Llama 3 8B's grouping): 41.9M attention
parameters a layer, 7.0B in all; a KV cache of 2,048 values per token per layer.
Same embedding, 32 layers of width 4096, SwiGLU 12288 and DeepSeek-V2's vocabulary as
configs/mla_7b.py, so the 7B points differ in attention alone; presets as there: `:smoke` (CPU,
seconds), `:1gpu` (one 80 GB GPU, optimizer state in host memory).
"""

from configs import mla_7b

PRESETS = ('smoke', '1gpu')  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = mla_7b.get_config(preset)
  m = c.model
  m.attention = 'gqa'
  m.num_kv_heads = 2 if preset == 'smoke' else 8  # smoke: 4 query heads
  return c
