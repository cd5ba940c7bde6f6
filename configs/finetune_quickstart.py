"""Quick start, step two: LoRA on the quick start's pretrained model, teaching it to complete
Python functions from their signature and docstring (the offline instruction set).

    python -m experiments.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.main --config=configs/finetune_quickstart.py \\
        --config.model.init=run:runs/quickstart

The quick start's shape (so that without model.init it still runs, from a random base);
model.init replaces it with the run's. LoRA r 16 on every linear layer, the held-out loss
counted on answer tokens only. Presets: `:smoke` (seconds, for tests).
"""

from configs import base, quickstart

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  c = base.get_config()
  q = quickstart.get_config(preset)
  c.model = q.model
  c.kind = 'finetune'
  c.finetune.method = 'lora'
  c.finetune.rank = 16
  c.finetune.alpha = 32.0
  c.data.corpus = 'functions'
  # Byte tokens of Alpaca's prompt, a signature and a docstring: most prompts fit in 512.
  c.data.seq_len = 512
  c.data.eval_fraction = 0.05  # by source file: ~30 files, ~250 functions
  t = c.train
  t.steps = 100
  t.global_batch_size = 8
  t.learning_rate = 2e-3
  t.warmup_steps = 10
  t.weight_decay = 0.0
  t.b2 = 0.999
  t.eval_every = 50
  t.checkpoint_every = 50
  t.eval_batches = 4
  if preset == 'smoke':
    base.smoke_training(c)
    c.data.seq_len = 512
    c.data.eval_fraction = 0.1  # of 200 files
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for finetune_quickstart; valid: smoke')
  return c
