"""Qwen2.5-shaped dense decoders: the base shapes of the attention and MoE studies.

`get_config(preset, size)` with size '0.5b', '1.5b' (the attention study's shape, EfficientLLM
Table 3) or '3b': Qwen2.5's layer count, hidden size, heads (GQA over 2 K/V heads, 128- or
64-wide), SwiGLU width, q/k/v biases, tied embeddings and RoPE θ = 10⁶. Study configs
(`attention_*.py`, `dense_*.py`, `moe_*.py`) start here and change only their study point.

Parameters with the offline byte tokenizer (vocabulary 384) / with Qwen2.5's 151,936-token
vocabulary (`--config.data.tokenizer=/path/to/qwen2.5/tokenizer.json`): 0.5b 0.36B / 0.49B,
1.5b 1.31B / 1.54B, 3b 2.78B / 3.09B.
Presets: `:smoke` (a 2-layer, 64-wide cut that trains on a laptop CPU in seconds).
"""

from configs import base

# size: (layers, hidden, query heads, head dim, SwiGLU width)
SHAPES = {
    '0.5b': (24, 896, 14, 64, 4864),
    '1.5b': (28, 1536, 12, 128, 8960),
    '3b': (36, 2048, 16, 128, 11008),
}

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None, size='1.5b'):
  c = base.get_config()
  m = c.model
  m.num_layers, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim = SHAPES[size]
  m.attention = 'gqa'
  m.num_kv_heads = 2
  m.qkv_bias = True
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
