"""MoE study, dense baseline: the 3B Qwen2.5-shaped model (2.78B with the byte tokenizer).

36 layers, hidden 2048. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='3b')
  c.train.global_batch_size = 8  # half of 1.5B's, for twice the parameters (not yet run on a GPU)
  return c
