"""A DeepSeek-V2-style dense model of ~7B parameters with multi-head latent attention.

DeepSeek-V2's attention (arXiv 2405.04434 §2.1: 128-wide heads, query latent 1536, K/V latent
512, a 64-wide decoupled RoPE key) on a dense body: 32 layers, hidden 4096, 32 heads, SwiGLU
12288, DeepSeek-V2's vocabulary of 102,400 (untied). Per layer: 39.1M attention + 151.0M MLP;
total 6.92B. Its KV cache is 576 values per token per layer (36.9 KB/token in bf16 over 32
layers), against 8,192 for the MHA it replaces.

Memory: fp32 parameters with AdamW hold 16 bytes per parameter (111 GB), more than one 80 GB
GPU: the default needs several on the FSDP mesh (a run prints its memory plan first and stops
with the numbers where a step cannot fit). `:1gpu` fits one 80 GB GPU: AdamW's moments (55 GB)
in host memory (train.offload_optimizer), fp32 params and gradients (2 x 27.7 GB) on the device,
every layer rematerialised, 2 x 4096 tokens a step (gradient accumulation would need a second
fp32 gradient buffer, which does not fit beside them). Run it with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: JAX takes 75% of a GPU by default. The other 7B attention
points (configs/{gqa,mqa,nsa}_7b.py) are this body with their attention. Presets: `:smoke`
(CPU, seconds), `:1gpu`.
"""

from configs import base

PRESETS = ('smoke', '1gpu')  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = base.get_config()
  m = c.model
  m.vocab_size = 102400
  m.embed_dim = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.mlp_dim = 12288
  m.attention = 'mla'
  m.mla.q_lora_rank = 1536
  m.mla.kv_lora_rank = 512
  m.mla.qk_nope_head_dim = 128
  m.mla.qk_rope_head_dim = 64
  m.mla.v_head_dim = 128
  m.norm_eps = 1e-6
  m.remat = 'full'
  c.data.seq_len = 4096
  c.train.global_batch_size = 32
  c.train.steps = 5000
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if preset == 'smoke':
    m.vocab_size = None  # the byte tokenizer's
    m.embed_dim = 64
    m.num_layers = 2
    m.num_heads = 4
    m.mlp_dim = 128
    m.mla.q_lora_rank = 32
    m.mla.kv_lora_rank = 32
    m.mla.qk_nope_head_dim = 16
    m.mla.qk_rope_head_dim = 8
    m.mla.v_head_dim = 16
    base.smoke_training(c)
  elif preset == '1gpu':
    c.train.offload_optimizer = True
    c.train.global_batch_size = 2
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for mla_7b; valid: smoke, 1gpu')
  return c
