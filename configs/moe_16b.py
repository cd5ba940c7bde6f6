"""MoE study: a DeepSeek-V2-Lite-style model (arXiv 2405.04434, the 16B "Lite" release).

27 layers, hidden 2048, 16 MLA heads (no query compression, 512-wide K/V latent, 128 + 64-wide
q/k heads, 128-wide values); the first layer dense (SwiGLU 10944), the other 26 with 64 routed
experts of width 1408, top-6 by softmax without renormalisation, and 2 shared experts;
vocabulary 102,400 (DeepSeek-V2's), untied. 15.7B parameters, 2.66B active per token
(embeddings included; tests/test_moe_configs.py checks both).

One 80 GB GPU cannot hold its fp32 training state (16 bytes per parameter): use several on the
default FSDP mesh, or `mesh.expert` for expert parallelism. Presets: `:smoke` (CPU), `:1gpu`
(4 layers, for the per-strategy step-time comparison on one GPU).
"""

from configs import base

PRESETS = ('smoke', '1gpu')  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = base.get_config()
  m = c.model
  m.vocab_size = 102400
  m.embed_dim = 2048
  m.num_layers = 27
  m.num_heads = 16
  m.mlp_dim = 10944  # the dense first layer
  m.norm_eps = 1e-6
  m.attention = 'mla'
  m.mla.q_lora_rank = 0
  m.mla.kv_lora_rank = 512
  m.mla.qk_nope_head_dim = 128
  m.mla.qk_rope_head_dim = 64
  m.mla.v_head_dim = 128
  m.ffn = 'moe'
  e = m.moe
  e.num_experts = 64
  e.top_k = 6
  e.expert_dim = 1408
  e.num_shared_experts = 2
  e.first_dense_layers = 1
  e.router = 'softmax'
  e.norm_topk_prob = False
  e.routed_scaling_factor = 1.0
  e.aux_loss_coef = 0.001
  e.dispatch = 'dropless'
  m.remat = 'full'
  c.data.seq_len = 4096
  c.train.global_batch_size = 32
  c.train.steps = 5000
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if preset == '1gpu':
    # 4 layers (1 dense + 3 MoE, 1.84B parameters: 29 GB of fp32 state with AdamW) and 2 x 4096
    # tokens per step: one H100 ran every dispatch strategy at this size, `dense` included
    # (experiments/results/h100/README.md).
    m.num_layers = 4
    m.vocab_size = None  # the byte tokenizer's: the head is not what is compared
    c.train.global_batch_size = 2
    c.train.steps = 60
    c.train.warmup_steps = 10
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
  elif preset == 'smoke':
    m.vocab_size = None
    m.embed_dim = 64
    m.num_layers = 2
    m.num_heads = 4
    m.mlp_dim = 128
    m.mla.kv_lora_rank = 32
    m.mla.qk_nope_head_dim = 16
    m.mla.qk_rope_head_dim = 8
    m.mla.v_head_dim = 16
    e.num_experts = 8
    e.top_k = 3
    e.expert_dim = 32
    base.smoke_training(c)
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for moe_16b; valid: smoke, 1gpu')
  return c
