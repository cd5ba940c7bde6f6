"""Inference study point: bf16 weights and compute, the baseline every precision is measured
against, served from Llama-3.2-1B's shape.

The inference axis (EfficientLLM §4.3) serves one model at several precisions on the same
workload: 64 requests of 128-512 prompt tokens from held-out documents, 256 new tokens each,
on 16 decode slots (offline scenario: all arrive at once; `inference.scenario=server` for
Poisson arrivals at `inference.rate_per_s`). The shape is configs/finetune_lora.py's
(1.24B parameters); with `--config.model.init=hf:DIR` or `run:WORKDIR` a real model replaces
it, without it the weights are random: costs are real, quality is not.

The other precisions change only `inference`: configs/infer_{fp16,int8,int4,fp8}.py. Presets:
`:smoke` (CPU, seconds; a tiny random model) and `:quickstart` (the offline chain: serve
`configs/quickstart.py`'s run, `--config.model.init=run:WORKDIR`, on a laptop CPU).
"""

from configs import base, finetune_lora

PRESETS = ('smoke', 'quickstart')  # --help lists them; no preset is the full size


def study_point(precision: str, preset=None, **inference):
  """The inference study's shared config at `inference.precision = precision`."""
  c = base.get_config()
  c.kind = 'inference'
  if preset is None:
    c.model = finetune_lora.study_point('lora').model
    c.data.seq_len = 1024           # held-out perplexity windows and calibration sequences
  elif preset == 'smoke':
    c.model.vocab_size = None
    c.model.embed_dim = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.data.seq_len = 64
    c.data.max_documents = 200
  elif preset == 'quickstart':
    # configs/quickstart.py's run fixes the architecture through model.init.
    c.data.seq_len = 256
  else:
    raise ValueError(f'unknown preset {preset!r} for infer_{precision}; valid: smoke, quickstart')
  c.model.param_dtype = 'float32'   # as loaded; the precision decides what is stored
  i = c.inference
  i.precision = precision
  if preset == 'smoke':
    i.num_slots = 2
    i.max_len = 48
    i.prefill_chunk = 16
    i.num_requests = 3
    i.input_lengths = 'uniform:4:24'
    i.output_lengths = '6'
    i.eval_batches = 1
    i.calibration_samples = 4
    i.group_size = 32
  elif preset == 'quickstart':
    i.num_slots = 8
    i.max_len = 320
    i.prefill_chunk = 128
    i.num_requests = 24
    i.input_lengths = 'uniform:64:192'
    i.output_lengths = '64'
    i.eval_batches = 4
    i.calibration_samples = 32
    i.group_size = 32             # the quick start's 128-wide layers hold 4 groups
    # Which line comes next, in standard-library files the quick start never trained on.
    i.eval_tasks = 'stdlib_next_line'
  for key, value in inference.items():
    i[key] = value
  return c


def get_config(preset=None):
  return study_point('bf16', preset)
