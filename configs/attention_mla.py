"""Attention study, MLA: DeepSeek-V2's multi-head latent attention at the 1.5B shape.

12 heads with DeepSeek-V2's head geometry (128 + 64-wide decoupled RoPE queries/keys, 128-wide
values), a 512-wide K/V latent and a 512-wide query latent: 6.78M attention parameters per layer
against GQA's 5.51M, +2.7% in total, the nearest DeepSeek-shaped point to GQA's size (without
query compression it is +6.1%). It caches 576 values per token per layer against GQA's 512 and
MHA's 3072. Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = qwen2p5.get_config(preset, size='1.5b')
  m = c.model
  m.attention = 'mla'
  m.num_kv_heads = None
  m.qkv_bias = False  # DeepSeek's projections have none
  m.mla.q_lora_rank = 512
  m.mla.kv_lora_rank = 512
  m.mla.qk_nope_head_dim = 128
  m.mla.qk_rope_head_dim = 64
  m.mla.v_head_dim = 128
  if preset == 'smoke':
    m.mla.q_lora_rank = 32
    m.mla.kv_lora_rank = 32
    m.mla.qk_nope_head_dim = 16
    m.mla.qk_rope_head_dim = 8
    m.mla.v_head_dim = 16
  return c
