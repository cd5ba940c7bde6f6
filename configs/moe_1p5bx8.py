"""MoE study (EfficientLLM Table 5), 1.5B×8: 8 experts a layer, top-2, on the 1.5B Qwen2.5 shape.

The 1.5B Qwen2.5-shaped model with 8 experts of its MLP's width per layer, top-2 (see
moe_0p5bx8.py for the recipe). 9.40B parameters with the byte tokenizer, 2.47B active per token:
compare with dense_1p5b.py and dense_3b.py. Presets: `:smoke`.
"""

from configs import moe_0p5bx8

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = moe_0p5bx8.get_config(preset, size='1.5b')
  c.train.global_batch_size = 8
  return c
