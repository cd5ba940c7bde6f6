"""The attention study's shape: the paper's 1.5B Qwen2.5-like decoder (EfficientLLM Table 3).

28 layers, hidden 1536, 12 query heads of 128, SwiGLU 8960, q/k/v biases, tied embeddings, RoPE
θ = 10⁶: Qwen2.5-1.5B's shape, here with GQA over 2 K/V heads as in Qwen2.5. The
`attention_<variant>.py` files change only the attention; everything else is equal.

Parameters: 1.31B with the offline byte tokenizer (vocabulary 384); 1.54B, Qwen2.5-1.5B's count,
with its 151,936-token vocabulary (`--config.data.tokenizer=/path/to/qwen2.5/tokenizer.json`).
Presets: `:smoke` (a 2-layer, 64-wide cut that trains on a laptop CPU in seconds).
"""

from configs import base


def get_config(preset=None):
  c = base.get_config()
  m = c.model
  m.embed_dim = 1536
  m.num_layers = 28
  m.num_heads = 12
  m.head_dim = 128
  m.attention = 'gqa'
  m.num_kv_heads = 2
  m.qkv_bias = True
  m.mlp_dim = 8960
  m.tie_embeddings = True
  m.rope_theta = 1e6
  m.norm_eps = 1e-6
  m.remat = 'dots_saveable'
  c.data.seq_len = 4096
  c.train.global_batch_size = 16
  c.train.steps = 5000
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 1000
  if preset == 'smoke':
    m.embed_dim = 64
    m.num_layers = 2
    m.num_heads = 4
    m.head_dim = 16
    m.mlp_dim = 128
    base.smoke_training(c)
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r}; valid: smoke')
  return c
