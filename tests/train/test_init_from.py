"""A run starts from trained weights (model.init): a project run's checkpoint through the command,
a Hugging Face export of it in process; either way its first held-out loss is the source's last
one, and a source the run cannot use is refused before anything is built."""

import json
import os

import jax
import numpy as np
import pytest

from configs import base
from efficientjax.errors import ConfigError
from efficientjax.hf import save_llama
from efficientjax.metrics.record import read_records, validate_record
from efficientjax.model import ModelConfig
from efficientjax.train import init_from
from efficientjax.train.loop import train
from tests.helpers import smoke_config
from tests.test_cli import _main  # the command as a user runs it, on one CPU device

ONE = jax.devices()[:1]
DEFAULTS = base.get_config().model.to_dict()


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A finished quickstart:smoke run (checkpoints 3 and 6) and its final held-out loss."""
  workdir = tmp_path_factory.mktemp('source') / 'run'
  config = smoke_config()
  result = train(config, str(workdir), devices=ONE, progress=False)
  # What experiments.main keeps beside the checkpoints, and `resolve` reads.
  (workdir / 'config.json').write_text(json.dumps(config))
  return workdir, result.final_eval_loss



def test_the_command_continues_from_a_runs_checkpoint(source, tmp_path):
  workdir, final_loss = source
  out = tmp_path / 'finetune'
  # The config file's shape is the quickstart's full size: the source's architecture (smoke)
  # replaces it, and the run says so.
  proc = _main('--config=configs/quickstart.py', f'--workdir={out}', '--config.train.steps=3',
               '--config.train.warmup_steps=1',
               '--config.data.seq_len=64', '--config.data.max_documents=200',
               '--config.train.global_batch_size=4', '--config.train.eval_batches=2',
               '--config.train.checkpoint_every=3',
               f'--config.model.init=run:{workdir}', '--config.model.scan_layers=false')
  assert proc.returncode == 0, proc.stderr
  assert f'weights and architecture from {workdir} (run, step 6)' in proc.stderr
  assert 'model.embed_dim: 128 -> 64' in proc.stderr
  (record,) = read_records(out / 'results.jsonl')
  validate_record(record)
  assert record['model']['init'] == {'source': f'run:{workdir}:6', 'kind': 'run',
                                     'path': str(workdir), 'step': 6, 'family': None}
  # The same weights and held-out data (and an unscanned layout, converted on load): the first
  # evaluation is the source's last, to float32 rounding of the other layout's reductions.
  assert record['quality']['initial_eval_loss'] == pytest.approx(final_loss, rel=1e-6)
  assert record['steps']['start'] == 0 and record['steps']['final'] == 3

  # A restart resumes from its own checkpoint and never reads the source again: moved away, its
  # record still names the step the weights came from.
  moved = tmp_path / 'moved'
  os.rename(workdir, moved)
  try:
    proc = _main('--config=configs/quickstart.py', f'--workdir={out}', '--config.train.steps=4',
                 '--config.train.warmup_steps=1', '--config.data.seq_len=64',
                 '--config.data.max_documents=200', '--config.train.global_batch_size=4',
                 '--config.train.eval_batches=2', '--config.train.checkpoint_every=3',
                 f'--config.model.init=run:{workdir}', '--config.model.scan_layers=false')
  finally:
    os.rename(moved, workdir)
  assert proc.returncode == 0, proc.stderr
  assert 'resumed from the checkpoint at step 3' in proc.stderr
  last = read_records(out / 'results.jsonl')[-1]
  assert last['steps']['start'] == 3 and last['model']['init']['step'] == 6


def test_the_command_refuses_an_override_that_contradicts_the_source(source, tmp_path):
  workdir, _ = source
  proc = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}/w',
               f'--config.model.init=run:{workdir}', '--config.model.num_layers=3')
  assert proc.returncode == 2
  assert ('config error: model.init: run:' in proc.stderr and
          'model.num_layers=3 (from the command line) but the source has 2' in proc.stderr)
  assert not os.path.exists(tmp_path / 'w')


def test_a_hugging_face_export_starts_at_the_sources_loss(source, tmp_path):
  workdir, final_loss = source
  config = smoke_config()
  cfg = ModelConfig.from_config(config['model'], tokenizer_vocab_size=257)
  weights = init_from.load(init_from.source(f'run:{workdir}:6'), cfg)
  export = save_llama(tmp_path / 'hf', weights['params'], cfg)

  model, src, _ = init_from.resolve({**config['model'], 'num_layers': 5,
                                     'init': f'hf:{export}'}, config['data'], DEFAULTS)
  assert src.kind == 'hf' and src.family == 'Llama' and model['num_layers'] == 2
  # A checkpoint with its own tokenizer runs only with it.
  (export / 'tokenizer.json').write_text('{}')
  with pytest.raises(ConfigError, match=f'has its own tokenizer.*data.tokenizer={export}'):
    init_from.resolve({**config['model'], 'init': f'hf:{export}'}, config['data'], DEFAULTS)
  (export / 'tokenizer.json').unlink()
  assert model['vocab_size'] == cfg.vocab_size  # from config.json, where it was derived
  run = {**config, 'model': model, 'train': {**config['train'], 'steps': 1,
                                             'checkpoint_every': 0}}
  (tmp_path / 'run').mkdir()
  result = train(run, str(tmp_path / 'run'), devices=ONE, progress=False)
  assert result.init['source'] == f'hf:{export}' and result.init['family'] == 'Llama'
  assert result.initial_eval_loss == pytest.approx(final_loss, rel=1e-6)


@pytest.mark.parametrize('spec, message', [
    ('nowhere', 'is not a weight source; use hf:DIR'),
    ('hf:', 'is not a weight source'),
    ('hf:/nonexistent/dir', 'is not a directory'),
])
def test_bad_sources_are_named(spec, message):
  with pytest.raises(ConfigError, match=message) as e:
    init_from.resolve({**smoke_config()['model'], 'init': spec}, smoke_config()['data'],
                      DEFAULTS)
  assert e.value.field == 'model.init'


def test_run_sources_are_checked_before_anything_is_read(source, tmp_path):
  workdir, _ = source
  config = smoke_config()
  with pytest.raises(ConfigError, match='no checkpoint at step 4 .* has steps 3, 6'):
    init_from.resolve({**config['model'], 'init': f'run:{workdir}:4'}, config['data'], DEFAULTS)
  other_tokenizer = {**config['data'], 'tokenizer': '/some/tokenizer.json'}
  with pytest.raises(ConfigError, match="tokenised with data.tokenizer='byte'"):
    init_from.resolve({**config['model'], 'init': f'run:{workdir}'}, other_tokenizer, DEFAULTS)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ConfigError, match='config.json is missing'):
    init_from.resolve({**config['model'], 'init': f'run:{tmp_path}/empty'}, config['data'],
                      DEFAULTS)
  # A LoRA run's checkpoints hold its adapters: not a model to start from.
  lora_run = tmp_path / 'lora'
  lora_run.mkdir()
  with open(f'{workdir}/config.json') as f:
    theirs = json.load(f)
  with open(lora_run / 'config.json', 'w') as f:
    json.dump({**theirs, 'kind': 'finetune', 'finetune': {'method': 'lora'}}, f)
  with pytest.raises(ConfigError, match="finetune.method='lora'.*finetune.export=merged"):
    init_from.resolve({**config['model'], 'init': f'run:{lora_run}'}, config['data'], DEFAULTS)


def test_a_state_around_given_weights_is_init_states_but_for_the_params():
  """state_from_variables: the same step, RNG, optimizer state (zero moments) and placement as
  init_state for the seed, with the given params; a missing routing bias starts at zeros."""
  from efficientjax import parallel  # pylint: disable=g-import-not-at-top
  from efficientjax.model import Transformer  # pylint: disable=g-import-not-at-top
  from efficientjax.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from efficientjax.train.state import (init_state, state_from_variables,  # pylint: disable=g-import-not-at-top
                                        state_shardings)
  c = smoke_config(**{'model.ffn': 'moe', 'model.moe.num_experts': 4, 'model.moe.aux_free': True,
                      'model.num_layers': 1})
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], ONE)
  abstract, shardings = state_shardings(model, tx, mesh, 16)
  reference = init_state(model, tx, mesh, 16, 3, shardings)
  weights = jax.tree.map(lambda x: np.asarray(x) + 1.0, reference.params)
  state = state_from_variables(tx, mesh, 3, shardings, abstract, {'params': weights})
  assert int(state.step) == 0 and np.array_equal(state.rng, reference.rng)
  jax.tree.map(np.testing.assert_array_equal, state.params, weights)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, tx.init(weights))
  jax.tree.map(np.testing.assert_array_equal, state.model_state, reference.model_state)
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  assert jax.tree.map(lambda a: a.sharding, state) == jax.tree.map(lambda a: a.sharding,
                                                                   reference)


def test_a_moe_run_restores_its_routing_biases_into_another_layout(tmp_path):
  """An aux-free MoE source (routing biases in the model state), restored into an unscanned
  run: params and biases change layout together, and equal the source's."""
  moe = {'model.ffn': 'moe', 'model.moe.num_experts': 4, 'model.moe.aux_free': True,
         'model.moe.bias_update_rate': 0.1, 'model.num_layers': 1, 'train.steps': 3,
         'train.checkpoint_every': 3, 'train.eval_every': 0}
  config = smoke_config(**moe)
  src = tmp_path / 'src'
  result = train(config, str(src), devices=ONE, progress=False)
  (src / 'config.json').write_text(json.dumps(config))
  model, source, _ = init_from.resolve({**config['model'], 'scan_layers': False,
                                        'init': f'run:{src}'}, config['data'], DEFAULTS)
  cfg = ModelConfig.from_config(model, tokenizer_vocab_size=257)
  variables = init_from.load(source, cfg)
  assert set(variables) == {'params', 'moe_state'} and 'block_0' in variables['moe_state']
  bias = variables['moe_state']['block_0']['mlp']['bias']
  assert result.moe['routing_bias_per_layer'] == [bias.tolist()]
  assert np.abs(bias).max() > 0  # moved from zero by the steps


def test_a_source_vocabulary_smaller_than_the_tokenizer_names_model_init():
  from experiments import validate  # pylint: disable=g-import-not-at-top
  c = smoke_config(**{'model.vocab_size': 128, 'model.init': 'hf:/some/checkpoint'})
  (error,) = validate.check_tokenizer(c, 257, num_devices=1)
  assert error.field == 'model.init' and 'fewer than this run\'s tokenizer (257)' in error.message
