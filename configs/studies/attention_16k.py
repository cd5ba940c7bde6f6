"""GQA against NSA training at 16k tokens, the 1.5B attention shapes: GPU only.

configs/attention_gqa.py (cuDNN flash attention) against the same model with NSA
(configs/attention_nsa.py's choices: one K/V group, the paper's sizes, its attention through
kernels/nsa's Triton kernels on the GPU), one sequence of 16384 tokens a step, 12 steps, one
seed: the NSA issue's "a training step at 16k faster than GQA's". On a CPU, NSA's attention
is the dense reference, whose [16k, 16k] scores per head do not fit: do not run it there.
"""

TRAIN = {'data.seq_len': 16384, 'train.global_batch_size': 1, 'train.steps': 12,
         'train.warmup_steps': 2, 'train.eval_every': 0, 'train.eval_batches': 1,
         'train.checkpoint_every': 0, 'train.log_every': 4, 'train.timing_warmup_steps': 4,
         'model.remat': 'full'}


def get_study():
  return dict(
      name='attention_16k',
      axis='attention',
      base='configs/attention_gqa.py',
      overrides=TRAIN,
      points={
          'gqa': {},
          'nsa': {'model.attention': 'nsa', 'model.num_kv_heads': 1},
      },
      repeats=1,
      timeout_s=900,
  )
