"""Positional encodings at an equal token budget, small: RoPE, absolute (sinusoidal), learned,
relative (T5 buckets) and none, on the quick start's model (MHA), 60 steps of 8 × 256 tokens,
three seeds. About 10 minutes on a 2-core CPU.
"""

from configs.studies.attention_small import TRAIN


def get_study():
  return dict(
      name='positions_small',
      axis='position',
      base='configs/quickstart.py',
      overrides=TRAIN,
      grid={'model.position': ['rope', 'absolute', 'learned', 'relative', 'none']},
      repeats=3,
  )
