"""The inference study's configs: valid, and runnable end to end with records that add up.

Every `configs/infer_*.py:smoke` runs through the CLI as a user runs it; int4 (AWQ) serves a
trained project run (`model.init=run:`) and is rerun to read its quantised weights back. The
int8 KV cache and the server scenario run together (one run) through the runner the CLI calls
(experiments/inference.py), in this process. Every record is validated against the schema
and checked against what the run itself measured.
"""

import functools
import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.errors import ConfigError
from efficientjax.infer import run as infer_run
from efficientjax.metrics.record import read_records, validate_record
from experiments import inference, validate
from tests.attention.variants import TINY
from tests.helpers import jitted_init
from tests.test_cli import _main

PRECISIONS = ('bf16', 'fp16', 'int8', 'int4', 'fp8')


def _config(name, preset=None):
  return importlib.import_module(f'configs.{name}').get_config(preset)


@pytest.mark.parametrize('preset', [None, 'smoke', 'quickstart'])
@pytest.mark.parametrize('precision', PRECISIONS)
def test_configs_validate(precision, preset):
  c = _config(f'infer_{precision}', preset).to_dict()
  assert c['kind'] == 'inference' and c['inference']['precision'] == precision
  assert validate.check(c, num_devices=1, process_count=1, backend='gpu') == []


@pytest.mark.parametrize('overrides, field, words', [
    ({'inference.group_size': 48}, 'inference.group_size', 'divide'),
    ({'inference.max_len': 20}, 'inference.max_len', 'longest request'),
    ({'inference.output_lengths': 'gamma:3'}, 'inference.output_lengths', 'unknown length'),
    ({'inference.scenario': 'server', 'inference.rate_per_s': 0.0}, 'inference.rate_per_s', ''),
    ({'inference.eval_tasks': '/no/such/task.yaml'}, 'inference.eval_tasks', 'not a file'),
    ({'inference.eval_tasks': 'configs/base.py'}, 'inference.eval_tasks', 'configs/base.py'),
    ({'model.ffn': 'moe', 'model.moe.dispatch': 'capacity'}, 'model.moe.dispatch', 'dropless'),
    ({'inference.precision': 'fp16', 'model.attention': 'mla'}, 'inference.precision', 'CPU'),
    ({'model.position': 'learned', 'inference.max_len': 80}, 'inference.max_len', 'learned'),
])
def test_bad_inference_settings_name_the_field(overrides, field, words):
  c = _config('infer_int4', 'smoke').to_dict()
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[key] = value
  errors = validate.check(c, num_devices=1, process_count=1, backend='cpu')
  assert [e.field for e in errors] == [field], errors
  assert words in errors[0].message


def _check_record(record, config):
  """What every inference record must say, against the config and its own measurements."""
  validate_record(record)
  inf = record['inference']
  m, q = record['metrics'], record['quality']
  n = config['inference']['num_requests']
  assert m['throughput']['requests'] == n == inf['workload']['requests']
  outputs = [r['output_len'] for r in inf['requests']]
  assert all(1 <= o <= int(config['inference']['output_lengths']) for o in outputs)
  assert m['throughput']['output_tokens'] >= sum(outputs)
  assert m['latency']['ttft_ms']['count'] == n
  # Bytes: measured from the stored trees; the ratio and MCR follow from them and perplexity.
  c = m['compression']
  assert c['size_ratio'] == pytest.approx(c['baseline_weight_bytes'] / c['weight_bytes'])
  assert q['quality_ratio'] == pytest.approx(q['baseline_eval_perplexity'] / q['eval_perplexity'])
  assert c['mcr'] == pytest.approx(c['size_ratio'] * q['quality_ratio'])
  assert q['eval_perplexity'] == pytest.approx(np.exp(q['eval_loss']))
  # A decode step reads every weight but the untied embedding's table, of which only a row
  # per slot; and the whole cache.
  model = record['model']['config']
  embed = model['vocab_size'] * model['embed_dim'] * 2  # bf16 at every precision
  rows = config['inference']['num_slots'] * model['embed_dim'] * 2
  assert not model['tie_embeddings']
  assert m['compute']['decode_weight_bytes_per_step'] == m['memory']['weight_bytes'] - embed + rows
  assert m['compute']['decode_bytes_per_step'] == (m['compute']['decode_weight_bytes_per_step']
                                                   + m['memory']['kv_cache_bytes'])
  return record


def test_int4_awq_through_the_cli_from_a_project_run(tmp_path):
  """The issue's command at smoke size: serve a trained run (model.init=run:) at int4 (AWQ);
  a rerun reads the quantised weights back instead of calibrating again."""
  train = _main('--config=configs/quickstart.py:smoke', f'--workdir={tmp_path}/train',
                '--config.train.steps=3', '--config.train.checkpoint_every=3',
                '--config.train.timing_warmup_steps=0', '--config.train.warmup_steps=1')
  assert train.returncode == 0, train.stderr
  args = ('--config=configs/infer_int4.py:smoke', f'--workdir={tmp_path}/serve',
          f'--config.model.init=run:{tmp_path}/train')
  first = _main(*args)
  assert first.returncode == 0, first.stderr
  assert 'not calibrated again' not in first.stdout
  again = _main(*args)
  assert again.returncode == 0, again.stderr
  assert 'not calibrated again' in again.stdout
  records = read_records(tmp_path / 'serve' / 'results.jsonl')
  with open(tmp_path / 'serve' / 'config.json') as f:
    config = json.load(f)
  for r in records:
    _check_record(r, config)
    assert r['model']['init']['kind'] == 'run'
    assert r['inference']['precision']['method'] == 'awq'
  assert records[0]['inference']['quantize_s'] > 0 and records[1]['inference']['quantize_s'] is None
  # The same weights and the same greedy workload: the same tokens and perplexity.
  assert records[0]['inference']['requests'] == records[1]['inference']['requests']
  assert records[0]['quality'] == records[1]['quality']
  c = records[0]['metrics']['compression']
  # Layers in 4 bits (+ a bf16 scale per 32), the embeddings and head (half of this tiny
  # model) in bf16; tests/quant checks the bytes exactly.
  assert 1.5 < c['size_ratio'] < 4.0
  assert len(records[0]['inference']['precision']['quantized']) == 7  # q k v o gate up down


@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'int8', 'fp8'])
def test_smoke_presets_through_the_cli(precision, tmp_path):
  proc = _main(f'--config=configs/infer_{precision}.py:smoke', f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr
  (record,) = read_records(tmp_path / 'results.jsonl')
  _check_record(record, _config(f'infer_{precision}', 'smoke').to_dict())
  q, c = record['quality'], record['metrics']['compression']
  if precision == 'bf16':
    assert q['quality_ratio'] == 1.0 and c['size_ratio'] == 1.0
  else:
    # The same random weights in another format: close to bf16's perplexity, not equal.
    assert 0.9 < q['quality_ratio'] < 1.1
  # 8-bit layers (+ a scale per output), the embeddings and head (most of this tiny model) in
  # 16 bits: above 1, below 2; tests/quant checks the bytes exactly.
  expected_ratio = {'bf16': 1.0, 'fp16': 1.0, 'int8': (1.2, 2.0), 'fp8': (1.2, 2.0)}[precision]
  if isinstance(expected_ratio, tuple):
    assert expected_ratio[0] < c['size_ratio'] < expected_ratio[1]
  else:
    assert c['size_ratio'] == expected_ratio


@pytest.fixture(scope='module')
def server_int8(tmp_path_factory):
  """(record, config) of the bf16 smoke preset run through the runner the CLI calls, in the
  server scenario and with an int8 KV cache: independent settings, so one run (seconds) serves
  the two tests that read them."""
  config = _config('infer_bf16', 'smoke')
  config.inference.kv_cache_dtype = 'int8'
  config.inference.scenario = 'server'
  config.inference.rate_per_s = 20.0
  config.inference.num_requests = 4
  (record,) = read_records(inference.run(config, str(tmp_path_factory.mktemp('server_int8'))))
  return _check_record(record, config.to_dict()), config


def test_an_int8_kv_cache_holds_a_byte_per_value_and_a_scale_per_vector(server_int8):
  record, config = server_int8
  m = record['model']['config']
  slots, length = config.inference.num_slots, config.inference.max_len  # 48: whole chunks
  vectors = m['num_layers'] * 2 * slots * length * m['num_kv_heads']  # keys and values
  # int8 values (1 byte each) and a float32 scale per head_dim values; bf16 would be 2 bytes.
  assert record['metrics']['memory']['kv_cache_bytes'] == vectors * (m['head_dim'] + 4)


def test_quantised_weights_are_kept_per_settings(tmp_path):
  """A rerun at the same settings reads its folder back; a damaged folder is set aside (not
  deleted) and the weights quantised again; other settings get their own folder."""
  config = _config('infer_int8', 'smoke').to_dict()
  cfg = TINY['mha']
  params = jitted_init(cfg)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  quantized = functools.partial(infer_run._quantized, cfg=cfg, params=params,  # pylint: disable=protected-access
                                calibration=None, workdir=str(tmp_path), say=lambda msg: None)
  first, _, first_s = quantized(config)
  again, _, again_s = quantized(config)
  assert first_s is not None and again_s is None  # quantize_s is None when read back
  chex.assert_trees_all_equal(first, again)
  (folder,) = (tmp_path / 'quantized').iterdir()
  for f in folder.rglob('*'):
    if f.is_file():
      f.write_bytes(b'not a checkpoint')
  _, _, redone_s = quantized(config)
  assert redone_s is not None
  assert len(list((tmp_path / 'quantized').glob(f'{folder.name}.set_aside-*'))) == 1
  config['inference']['quantize_lm_head'] = True
  quantized(config)
  assert len([f for f in (tmp_path / 'quantized').iterdir() if 'set_aside' not in f.name]) == 2


def test_the_server_scenario_admits_requests_as_they_arrive(server_int8):
  """Poisson arrivals: nobody is served before arriving, and latencies count from arrival."""
  record, _ = server_int8
  w, lat = record['inference']['workload'], record['metrics']['latency']
  assert w['scenario'] == 'server' and w['arrival_span_s'] > 0 and w['offered_rate_per_s'] > 0
  # The window spans the arrivals; every TTFT is measured from its own arrival.
  assert lat['window_s'] >= w['arrival_span_s']
  assert lat['ttft_ms']['count'] == 4 and lat['ttft_ms']['p50'] > 0
  assert lat['e2e_ms']['max'] <= lat['window_s'] * 1e3


def test_a_request_longer_than_the_engine_stops_the_run_before_any_work(tmp_path, monkeypatch):
  """Lengths drawn from a normal have no bound validation can check: the run checks the drawn
  requests first, before quantising, evaluating or compiling anything."""
  config = _config('infer_int8', 'smoke')
  config.inference.output_lengths = 'normal:40:1'  # + prompts of 4..24 > max_len 48
  monkeypatch.setattr(infer_run.quant, 'quantize', lambda *a, **k: pytest.fail('quantised'))
  with pytest.raises(ConfigError) as e:
    inference.run(config, str(tmp_path))
  assert e.value.field == 'inference.max_len' and 'do not fit 48 tokens' in e.value.message
