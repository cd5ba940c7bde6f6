"""Quick start: a small byte-level Llama-style model on the Python standard library's source.

Runs on a 2-core CPU in about 2¼ minutes; the held-out perplexity falls from ~394 (random
init over the byte vocabulary padded to 384) to ~13.5. Presets: `:smoke` (seconds, for tests).
"""

from configs import base

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = base.get_config()
  c.model.embed_dim = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.dtype = 'float32'  # bf16 matmuls are emulated on CPUs and run slower than fp32
  c.data.seq_len = 256
  c.train.steps = 130
  c.train.global_batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 13
  c.train.eval_every = 65
  c.train.checkpoint_every = 65
  c.train.eval_batches = 4  # 64 held-out sequences: enough to compare, cheap to repeat
  if preset == 'smoke':
    c.model.embed_dim = 64
    c.model.num_layers = 2
    c.model.mlp_dim = 128
    c.data.seq_len = 64
    c.data.max_documents = 200
    c.train.steps = 6
    c.train.global_batch_size = 4
    c.train.warmup_steps = 2
    c.train.eval_every = 3
    c.train.eval_batches = 2
    c.train.checkpoint_every = 3
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for quickstart; valid: smoke')
  return c
