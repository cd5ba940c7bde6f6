"""MoE study (EfficientLLM Table 5), 0.5B×8: 8 experts a layer, top-2, on the 0.5B Qwen2.5 shape.

The 0.5B Qwen2.5-shaped model with each MLP replaced by 8 experts of the same width,
top-2 routed (softmax, renormalised, as Mixtral), with the Switch load-balancing loss at 0.01
and dropless dispatch. 2.55B parameters with the byte tokenizer, of which 0.67B are active per
token (the record's `moe.params_active`). Presets: `:smoke`.
"""

from configs import qwen2p5

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None, size='0.5b'):
  c = qwen2p5.get_config(preset, size=size)
  m = c.model
  m.ffn = 'moe'
  m.moe.num_experts = 8
  m.moe.top_k = 2
  m.moe.expert_dim = None  # = model.mlp_dim: an expert is the dense model's MLP
  m.moe.router = 'softmax'
  m.moe.norm_topk_prob = True
  m.moe.aux_loss_coef = 0.01
  m.moe.dispatch = 'dropless'
  if preset == 'smoke':
    m.moe.num_experts = 4
  return c
