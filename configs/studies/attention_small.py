"""Attention variants at an equal token budget, small: the paper's Table 3 at CPU scale.

MHA, MQA, GQA, MLA and NSA on the quick start's model (4 layers, 128 wide, 4 heads of 32;
byte-level tokens of the Python standard library), each trained for the same 60 steps of
8 × 256 tokens, three seeds. MLA and NSA are scaled down with the model (MLA: 64-wide latents,
32 + 16-wide query/key heads; NSA: blocks of 16 at stride 8, 4 selected blocks of 32, a
64-token window, one K/V group). About 10 minutes on a 2-core CPU.
"""

TRAIN = {'train.steps': 60, 'train.global_batch_size': 8, 'train.warmup_steps': 6,
         'train.eval_every': 0, 'train.eval_batches': 4, 'train.checkpoint_every': 0,
         'train.log_every': 10, 'train.timing_warmup_steps': 3, 'data.seq_len': 256}


def get_study():
  return dict(
      name='attention_small',
      axis='attention',
      base='configs/quickstart.py',
      overrides=TRAIN,
      points={
          'mha': {'model.attention': 'mha'},
          'mqa': {'model.attention': 'mqa', 'model.num_kv_heads': 1},
          'gqa': {'model.attention': 'gqa', 'model.num_kv_heads': 2},
          'mla': {'model.attention': 'mla', 'model.mla.q_lora_rank': 64,
                  'model.mla.kv_lora_rank': 64, 'model.mla.qk_nope_head_dim': 32,
                  'model.mla.qk_rope_head_dim': 16, 'model.mla.v_head_dim': 32},
          'nsa': {'model.attention': 'nsa', 'model.num_kv_heads': 1, 'model.nsa.block_len': 16,
                  'model.nsa.stride': 8, 'model.nsa.select_block_len': 32,
                  'model.nsa.num_selected': 4, 'model.nsa.window': 64},
      },
      repeats=3,
  )
