"""Attention study, NSA: native sparse attention at the 1.5B shape, with the paper's sizes.

NSA (arXiv 2502.11089) with the paper's branch sizes (compression blocks of 32 at stride 16, 16
selected blocks of 64, a 512-token window) and one K/V group: all 12 query heads share their
selected blocks. Its three branches each have their own keys and values, so with GQA's 2 groups
it would be +5.8% parameters against GQA; with one group it is +3.3% (7.05M attention parameters
per layer against 5.51M). The attention runs through kernels/nsa's Pallas-Triton kernels on an
NVIDIA GPU and as the dense reference elsewhere (model.nsa.implementation='auto'); on a CPU it
measures NSA's quality and its cost as XLA runs the reference, not a sparse kernel's speed.
Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='1.5b')
  m = c.model
  m.attention = 'nsa'
  m.num_kv_heads = 1
  n = m.nsa
  n.block_len, n.stride, n.select_block_len, n.num_selected, n.window = 32, 16, 64, 16, 512
  n.compression = 'mlp'
  if preset == 'smoke':  # 64-token sequences: blocks of 8, 4 selected, a 16-token window
    n.block_len, n.stride, n.select_block_len, n.num_selected, n.window = 8, 4, 8, 4, 16
  return c
