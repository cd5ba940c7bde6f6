"""MoE against dense at equal active parameters, small: the paper's Table 5 at CPU scale.

The quick start's model with its 512-wide MLP (dense), against mixtures whose routed work per
token equals it: 4 experts of 512 with top-1, and 8 experts of 256 with top-2 (finer-grained);
and a dense MLP of 2048, the width of the 4-expert mixture's total parameters (equal total
parameters: the upper reference). Dropless dispatch, Switch balancing loss 0.01. 60 steps of
8 × 256 tokens, three seeds; about 8 minutes on a 2-core CPU.
"""

from configs.studies.attention_small import TRAIN

_MOE = {'model.ffn': 'moe', 'model.moe.dispatch': 'dropless', 'model.moe.aux_loss_coef': 0.01}


def get_study():
  return dict(
      name='moe_small',
      axis='ffn',
      base='configs/quickstart.py',
      overrides=TRAIN,
      points={
          'dense_512': {'model.ffn': 'dense', 'model.mlp_dim': 512},
          'moe_4x512_top1': {**_MOE, 'model.moe.num_experts': 4, 'model.moe.top_k': 1,
                             'model.moe.expert_dim': 512},
          'moe_8x256_top2': {**_MOE, 'model.moe.num_experts': 8, 'model.moe.top_k': 2,
                             'model.moe.expert_dim': 256},
          'dense_2048': {'model.ffn': 'dense', 'model.mlp_dim': 2048},
      },
      repeats=3,
  )
