"""A Llama-style dense model of ~1.2B parameters: the dense runs' shape and GPU step reference.

24 layers, 2048 wide, 16 heads, SwiGLU 5632: the base shape of the study's dense runs, and the
GPU reference for the training step's speed.

Byte-level tokens on the standard-library corpus keep it offline; the 384-entry vocabulary
makes the head negligible, so the step is the transformer stack. Presets: `:smoke` (CPU).
"""

from configs import base

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = base.get_config()
  c.model.remat = 'dots_saveable'
  c.data.seq_len = 4096
  c.train.global_batch_size = 4
  c.train.steps = 2000
  c.train.warmup_steps = 200
  c.train.eval_every = 500
  c.train.checkpoint_every = 1000
  if preset == 'smoke':
    c.model.num_layers = 2
    c.model.embed_dim = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.dtype = 'float32'
    c.data.seq_len = 128
    c.data.max_documents = 200
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.checkpoint_every = 0
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for llama_1b; valid: smoke')
  return c
