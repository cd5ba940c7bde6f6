"""The fine-tuning study's configs: valid, sized as documented, and runnable end to end.

Each `configs/finetune_*.py:smoke` runs: LoRA through the CLI as a user runs it, from a
Hugging Face checkpoint (its record validated against the schema, its peft adapter written),
the others through the runner the CLI calls (experiments/finetune.py: run_training with the
fine-tuning loop), in this process.
"""

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import pytest

from efficientjax.hf import save_llama
from efficientjax.hf.safetensors_io import load_checkpoint
from efficientjax.metrics.record import read_records, validate_record
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.finetune import finetune
from experiments import validate
from experiments.pretrain import run_training
from tests.helpers import short_chats
from tests.test_cli import _main

METHODS = ('full', 'freeze', 'lora', 'lora_plus', 'rslora', 'dora', 'pissa')
# Llama-3.2-1B as Hugging Face counts it: 1,235,814,400 parameters (tied embeddings).
LLAMA_3P2_1B_PARAMS = 1_235_814_400


def _config(name, preset=None):
  return importlib.import_module(f'configs.{name}').get_config(preset)


@pytest.mark.parametrize('preset', [None, 'smoke'])
@pytest.mark.parametrize('name', [f'finetune_{m}' for m in METHODS] + ['finetune_quickstart'])
def test_configs_validate(name, preset):
  c = _config(name, preset).to_dict()
  assert c['kind'] == 'finetune'
  if name != 'finetune_quickstart':
    assert c['finetune']['method'] == name[len('finetune_'):]
  assert validate.check(c, num_devices=1, process_count=1, backend='gpu') == []


def test_the_study_shape_is_llama_3p2_1b():
  c = _config('finetune_lora').to_dict()
  cfg = ModelConfig.from_config(c['model'], seq_len=c['data']['seq_len'])
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == LLAMA_3P2_1B_PARAMS


def test_lora_smoke_from_a_hugging_face_checkpoint_through_the_cli(tmp_path):
  """The issue's command at smoke size: --config.model.init=hf:DIR replaces the config's shape
  with the checkpoint's, and the adapter written at the end names it as its base."""
  cfg = ModelConfig(vocab_size=384, embed_dim=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=12, mlp_dim=96, attention='gqa')
  params = jax.jit(Transformer(cfg).init)(jax.random.key(5), jnp.zeros((1, 8), jnp.int32))
  save_llama(tmp_path / 'base', params['params'], cfg)
  proc = _main('--config=configs/finetune_lora.py:smoke', f'--workdir={tmp_path}/run',
               f'--config.model.init=hf:{tmp_path}/base', '--config.train.checkpoint_every=0',
               '--config.data.max_documents=80')
  assert proc.returncode == 0, proc.stderr
  (record,) = read_records(tmp_path / 'run' / 'results.jsonl')
  validate_record(record)
  assert record['model']['init']['kind'] == 'hf'
  assert record['model']['config']['embed_dim'] == 48  # the checkpoint's, not the preset's 64
  ft = record['finetune']
  assert ft['method'] == 'lora' and ft['export']['format'] == 'peft'
  assert ft['export']['family'] == 'Llama'
  with open(tmp_path / 'run' / 'adapter' / 'adapter_config.json') as f:
    adapter = json.load(f)
  assert adapter['r'] == record['config']['finetune']['rank']
  assert adapter['base_model_name_or_path'] == str(tmp_path / 'base')
  assert record['model']['trainable_params'] == ft['trainable_params'] < record['model']['params']
  q = record['quality']
  assert q['eval_loss'] < q['initial_eval_loss']


@pytest.mark.parametrize('method', [m for m in METHODS if m != 'lora'])
def test_smoke_presets_run(method, tmp_path):
  """The runner the CLI calls, on one device: the record's assembly is the same, and one
  device compiles without the partitioner (the multi-device step is tests/train's)."""
  config = _config(f'finetune_{method}', 'smoke')
  config.train.checkpoint_every = 0
  config.train.eval_every = 0
  # The preset's model and method, on short examples in short rows (compile and steps ~3x
  # cheaper): its own data, the offline `functions` set at 512 tokens, runs in the LoRA test.
  config.data.corpus, config.data.seq_len = short_chats(tmp_path / 'data'), 64
  config.train.steps = 4
  config.train.warmup_steps = 1
  if method == 'dora':
    config.finetune.export = 'merged'  # the merged model as a Hugging Face checkpoint
  assert validate.check(config.to_dict(), num_devices=1) == []
  one_device = functools.partial(finetune, devices=jax.devices()[:1], progress=False)
  path = run_training(config, str(tmp_path), one_device, sections=('finetune',))
  (record,) = read_records(path)
  validate_record(record)
  ft = record['finetune']
  assert ft['method'] == method
  if method == 'full':
    assert ft['trainable_params'] == record['model']['params'] and ft['frozen_bytes'] == 0
  else:
    assert ft['trainable_params'] < record['model']['params']
  q = record['quality']
  assert q['eval_loss'] < q['initial_eval_loss']
  if method == 'dora':
    assert ft['export']['format'] == 'hf' and ft['export']['family'] == 'Llama'
    fields, params = load_checkpoint(ft['export']['path'])
    assert fields['num_layers'] == config.model.num_layers
    assert sum(x.size for x in jax.tree.leaves(params)) == record['model']['params']
