"""The offline chain's adapter in peft: our fine-tuned logits against peft's.

    python experiments/results/cpu/finetune_quickstart/check_peft.py FINETUNE_WORKDIR

Exports the quick start's weights (the fine-tuning run's model.init) with
efficientjax.hf.save_llama, loads them in transformers, applies FINETUNE_WORKDIR/adapter with
peft.PeftModel.from_pretrained, and prints the largest logit difference from our adapted model
on 2 x 40 random byte tokens (and how far the adapter moves the logits). Needs the test extras
(torch, transformers, peft).
"""

import dataclasses
import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

from efficientjax.hf import save_llama
from efficientjax.model import ModelConfig, Transformer
from efficientjax.peft.interchange import load_adapter
from efficientjax.train import init_from

workdir = sys.argv[1]
with open(os.path.join(workdir, 'config.json')) as f:
  run_config = json.load(f)
with open(os.path.join(workdir, 'results.jsonl')) as f:
  record = json.loads(f.readline())
cfg = ModelConfig.from_config(record['model']['config'])
base_cfg = dataclasses.replace(cfg, adapter=None)
params = init_from.load(init_from.source(run_config['model']['init']), base_cfg)['params']
hf_dir = tempfile.mkdtemp()
save_llama(hf_dir, params, base_cfg)
hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
adapted = peft.PeftModel.from_pretrained(hf, os.path.join(workdir, 'adapter')).eval()
fields, adapters = load_adapter(os.path.join(workdir, 'adapter'), base_cfg)
tokens = np.random.default_rng(0).integers(0, 256, (2, 40))
ours = np.asarray(Transformer(cfg).apply({'params': params, 'adapters': adapters},
                                         jnp.asarray(tokens)))
base = np.asarray(Transformer(base_cfg).apply({'params': params}, jnp.asarray(tokens)))
with torch.no_grad():
  theirs = adapted(torch.tensor(tokens)).logits.numpy()
print('adapter fields:', fields)
print(f'max |ours - peft| = {np.abs(ours - theirs).max():.3g}; '
      f'max |adapted - base| = {np.abs(ours - base).max():.3g}')
