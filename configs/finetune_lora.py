"""Fine-tuning study point: LoRA (r 8, alpha 16, all linear layers) on Llama-3.2-1B's shape.

The fine-tuning axis (EfficientLLM §4.2) compares methods on one base: 16 layers, 2048 wide,
32 heads over 8 K/V heads of 64, SwiGLU 8192, tied 128,256-entry embeddings, Llama 3's RoPE
(theta 500,000, scaled ×32): 1.24B parameters. With `--config.model.init=hf:DIR` a real
Llama-3.2-1B (or any checkpoint of a supported family) replaces the shape and the weights;
without it the base is random, which measures the method's costs but not its quality. Data:
the offline instruction set made from the standard library's Python functions
(`functions`), or `--config.data.corpus=jsonl:PATH` (Alpaca or chat lines), rendered with the
checkpoint's chat template where it has one (`--config.data.tokenizer=DIR`).

The other methods change only `finetune`: configs/finetune_{full,freeze,lora_plus,rslora,
dora,pissa}.py. Presets: `:smoke` (CPU, seconds).
"""

from configs import base

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def study_point(method: str, preset=None):
  """The fine-tuning study's shared config with `finetune.method = method`."""
  c = base.get_config()
  c.kind = 'finetune'
  m = c.model
  m.vocab_size = 128256
  m.embed_dim = 2048
  m.num_layers = 16
  m.num_heads = 32
  m.num_kv_heads = 8
  m.attention = 'gqa'
  m.head_dim = 64
  m.mlp_dim = 8192
  m.tie_embeddings = True
  m.rope_theta = 500000.0
  m.llama3_rope.factor = 32.0
  m.llama3_rope.original_max_len = 8192
  m.max_seq_len = 131072
  f = c.finetune
  f.method = method
  f.rank = 8
  f.alpha = 16.0
  f.target_modules = 'all-linear'
  # The adapted methods hold the frozen base in bf16 (the trained params stay float32).
  f.base_dtype = None if method in ('full', 'freeze') else 'bfloat16'
  c.data.corpus = 'functions'
  c.data.seq_len = 1024
  # Held out by source file: 5% of the standard library's ~600 files is ~250 functions.
  c.data.eval_fraction = 0.05
  t = c.train
  t.steps = 1000
  t.global_batch_size = 16
  # Full fine-tuning moves every weight: a tenth of the adapters' rate (as in peft's and
  # LLaMA-Factory's examples, 2e-5 against 2e-4).
  t.learning_rate = 2e-5 if method in ('full', 'freeze') else 2e-4
  t.warmup_steps = 30
  t.weight_decay = 0.0              # transformers' Trainer default for fine-tuning
  t.b2 = 0.999
  t.eval_every = 250
  t.checkpoint_every = 500
  t.eval_batches = 8
  if preset == 'smoke':
    m.vocab_size = None
    m.embed_dim = 64
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = None
    m.mlp_dim = 128
    m.tie_embeddings = False
    m.max_seq_len = None
    base.smoke_training(c)
    # Byte tokens of Alpaca's prompt, a signature and a docstring: most functions' prompts
    # fit in 512, few in 256 (longer examples are cut at the end, answerless ones dropped).
    c.data.seq_len = 512
    c.data.eval_fraction = 0.1  # of 200 files: enough held-out functions for 2 batches
    t.learning_rate = 3e-3
  elif preset is not None:
    raise ValueError(f'unknown preset {preset!r} for finetune_{method}; valid: smoke')
  return c


def get_config(preset=None):
  return study_point('lora', preset)
