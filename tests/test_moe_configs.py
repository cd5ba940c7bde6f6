"""The MoE study's configs: valid, sized as documented, runnable end to end with the expert
statistics in their records."""

import importlib

import pytest

from efficientjax.metrics.record import read_records, validate_record
from efficientjax.model import ModelConfig
from efficientjax.moe.report import inactive_params
from experiments import validate
from tests.test_attention_configs import BYTE_VOCAB, _params
from tests.test_cli import _main

CONFIGS = ('moe_0p5bx8', 'moe_1p5bx8', 'moe_16b', 'dense_1p5b', 'dense_3b')


def _config(name, preset=None):
  return importlib.import_module(f'configs.{name}').get_config(preset).to_dict()


@pytest.mark.parametrize('preset', [None, 'smoke'])
@pytest.mark.parametrize('name', CONFIGS)
def test_configs_validate(name, preset):
  devices = 1 if preset == 'smoke' else 8  # a laptop; one 8-GPU node
  assert validate.check(_config(name, preset), num_devices=devices, process_count=1,
                        backend='gpu') == []


def test_moe_16b_one_gpu_preset_validates():
  assert validate.check(_config('moe_16b', '1gpu'), num_devices=1, process_count=1,
                        backend='gpu') == []


@pytest.mark.parametrize('name, total, active', [
    ('moe_0p5bx8', 2.55e9, 0.67e9), ('moe_1p5bx8', 9.40e9, 2.47e9), ('moe_16b', 15.71e9, 2.66e9),
    ('dense_1p5b', 1.31e9, 1.31e9), ('dense_3b', 2.78e9, 2.78e9)])
def test_parameter_counts_as_documented(name, total, active):
  c = _config(name)
  n = _params(c)
  cfg = ModelConfig.from_config(c['model'], tokenizer_vocab_size=BYTE_VOCAB)
  got_active = n - (inactive_params(cfg) if cfg.ffn == 'moe' else 0)
  assert n == pytest.approx(total, rel=5e-3) and got_active == pytest.approx(active, rel=5e-3)


# moe_0p5bx8 is moe_1p5bx8's layer at a smaller width (its preset validates above): the two
# runs cover both kinds of MoE config, Mixtral-style and DeepSeek-style.
@pytest.mark.parametrize('name', ['moe_1p5bx8', 'moe_16b'])
def test_smoke_preset_runs_and_records_expert_statistics(name, tmp_path):
  proc = _main(f'--config=configs/{name}.py:smoke', f'--workdir={tmp_path}',
               '--config.train.checkpoint_every=0')
  assert proc.returncode == 0, proc.stderr
  (record,) = read_records(tmp_path / 'results.jsonl')
  validate_record(record)
  moe = record['moe']
  cfg = record['model']['config']['moe']
  layers = record['model']['config']['num_layers'] - cfg['first_dense_layers']
  assert len(moe['load_per_layer']) == layers == len(moe['max_over_mean_load_per_layer'])
  tokens = record['steps']['tokens_per_step'] * moe['steps']
  for load in moe['load_per_layer']:  # every token's top-k assignments, counted once
    assert len(load) == cfg['num_experts'] and sum(load) == tokens * cfg['top_k']
  assert moe['dropped_fraction'] == 0.0  # dropless
  assert moe['aux_loss'] > 0 and moe['routing_bias_per_layer'] is None
  assert 0 < moe['params_active'] < record['model']['params']
