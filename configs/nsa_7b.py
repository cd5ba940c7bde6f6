"""The 7B attention point with native sparse attention: mla_7b.py's body, NSA's branches.

NSA (arXiv 2502.11089) with the paper's branch sizes (compression blocks of 32 at stride
16, 16 selected blocks of 64, a 512-token window) over 4 K/V groups of 8 query heads. On an
NVIDIA GPU the attention runs through kernels/nsa's Pallas-Triton kernels
(model.nsa.implementation='auto'); elsewhere through the dense reference, whose scores of three
branches are a layer's largest intermediates: its `:1gpu` takes one sequence a step, sized for
that reference.
Same embedding, 32 layers of width 4096, SwiGLU 12288 and DeepSeek-V2's vocabulary as
configs/mla_7b.py, so the 7B points differ in attention alone; presets as there: `:smoke` (CPU,
seconds), `:1gpu` (one 80 GB GPU, optimizer state in host memory).
"""

from configs import mla_7b

PRESETS = ('smoke', '1gpu')  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = mla_7b.get_config(preset)
  m = c.model
  m.attention = 'nsa'
  m.num_kv_heads = 1 if preset == 'smoke' else 4
  n = m.nsa
  n.block_len, n.stride, n.select_block_len, n.num_selected, n.window = 32, 16, 64, 16, 512
  if preset == 'smoke':  # 64-token sequences: blocks of 8, 4 selected, a 16-token window
    n.block_len, n.stride, n.select_block_len, n.num_selected, n.window = 8, 4, 8, 4, 16
  elif preset == '1gpu':
    # Each branch's masked dense scores are a layer's largest intermediates: one sequence a step.
    c.train.global_batch_size = 1
  return c
