"""The 7B attention point with multi-query attention: mla_7b.py's body, one K/V head.

32 query heads of 128 share one K/V head: 34.1M attention parameters a layer, 6.8B in
all; a KV cache of 256 values per token per layer.
Same embedding, 32 layers of width 4096, SwiGLU 12288 and DeepSeek-V2's vocabulary as
configs/mla_7b.py, so the 7B points differ in attention alone; presets as there: `:smoke` (CPU,
seconds), `:1gpu` (one 80 GB GPU, optimizer state in host memory).
"""

from configs import mla_7b

PRESETS = ('smoke', '1gpu')  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = mla_7b.get_config(preset)
  m = c.model
  m.attention = 'mqa'
  m.num_kv_heads = 1
  return c
