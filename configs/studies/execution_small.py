"""Compiler-fused (jit) against eager execution, small: what XLA's fusion buys per step.

The quick start's `:smoke` model (2 layers, 64 wide, 4 × 64 tokens a step) with MHA, MLA and
a 4-expert MoE, each trained for 20 steps as one compiled program (`execution=jit`) and op by op
under `jax.disable_jit` (`eager`: every primitive still compiled by XLA on its own), two seeds.
The report's eager-vs-jit table pairs each point's two modes. About 5 minutes on a 2-core CPU.
"""

_TRAIN = {'train.steps': 20, 'train.warmup_steps': 2, 'train.eval_every': 0,
          'train.eval_batches': 2, 'train.checkpoint_every': 0, 'train.timing_warmup_steps': 3}


def get_study():
  return dict(
      name='execution_small',
      axis='execution',
      base='configs/quickstart.py:smoke',
      overrides=_TRAIN,
      points={
          'mha': {'model.attention': 'mha'},
          'mla': {'model.attention': 'mla', 'model.mla.q_lora_rank': 32,
                  'model.mla.kv_lora_rank': 32, 'model.mla.qk_nope_head_dim': 16,
                  'model.mla.qk_rope_head_dim': 8, 'model.mla.v_head_dim': 16},
          'moe': {'model.ffn': 'moe', 'model.moe.num_experts': 4, 'model.moe.top_k': 2},
      },
      grid={'execution': ['jit', 'eager']},
      repeats=2,
  )
