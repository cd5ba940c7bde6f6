"""The attention study's configs: valid, sized as documented, and runnable end to end."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from efficientjax.model import ModelConfig, Transformer
from experiments import validate
from tests.test_cli import _main
from efficientjax.metrics.record import read_records, validate_record

VARIANTS = ('mha', 'gqa', 'mqa', 'mla', 'nsa')
BYTE_VOCAB = 257


def _config(variant, preset=None):
  return importlib.import_module(f'configs.attention_{variant}').get_config(preset).to_dict()


def _params(c) -> int:
  cfg = ModelConfig.from_config(c['model'], tokenizer_vocab_size=BYTE_VOCAB,
                                seq_len=c['data']['seq_len'])
  tokens = jax.ShapeDtypeStruct((1, c['data']['seq_len']), jnp.int32)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('preset', [None, 'smoke'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_configs_validate(variant, preset):
  c = _config(variant, preset)
  assert c['model']['attention'] == variant
  assert validate.check(c, num_devices=1, process_count=1, backend='gpu') == []


def test_parameter_counts_as_documented():
  counts = {v: _params(_config(v)) for v in VARIANTS}
  gqa = counts['gqa']
  assert 1.30e9 < gqa < 1.32e9  # qwen_1p5b.py: 1.31B with the byte vocabulary
  # MHA and MQA are defined by their head counts: MHA adds 28 layers x 10 x 1536 x 128 (+ biases)
  # of K/V projections, MQA removes 28 x 2 x 1536 x 128 (+ biases).
  assert counts['mha'] - gqa == 28 * (2 * 10 * 1536 * 128 + 2 * 10 * 128)
  assert gqa - counts['mqa'] == 28 * (2 * 1536 * 128 + 2 * 128)
  # MLA and NSA are sized to match GQA within 5% (each config file says how).
  for v in ('mla', 'nsa'):
    assert abs(counts[v] - gqa) / gqa < 0.05, (v, counts[v], gqa)


# One run per attention module: gqa and mqa are mha's module with fewer K/V heads (their
# record's numbers are worked out by hand in tests/metrics/test_architecture.py).
@pytest.mark.parametrize('variant', ['mha', 'mla', 'nsa'])
def test_smoke_preset_runs_through_the_cli(variant, tmp_path):
  proc = _main(f'--config=configs/attention_{variant}.py:smoke', f'--workdir={tmp_path}',
               '--config.train.checkpoint_every=0')
  assert proc.returncode == 0, proc.stderr
  (record,) = read_records(tmp_path / 'results.jsonl')
  validate_record(record)
  attn = record['model']['attention']
  assert attn['variant'] == variant
  # The cache arrays hold what the variant's formula says (same dtype: the compute dtype).
  assert attn['kv_cache_bytes_per_token_measured'] == pytest.approx(
      attn['kv_cache_bytes_per_token'], rel=0.1)
  assert attn['forward_flops_per_token']['attention'] > 0
  assert 0 < attn['params'] < record['model']['params']
  q = record['quality']
  assert q['eval_loss'] < q['initial_eval_loss']  # it learns, a little, in 6 steps


def test_the_alternatives_the_config_files_mention():
  """The counts the config docstrings give for the choices they did not make."""
  gqa = _params(_config('gqa'))
  mla = _config('mla')
  mla['model']['mla']['q_lora_rank'] = 0  # attention_mla.py: without query compression, +6.1%
  assert _params(mla) / gqa - 1 == pytest.approx(0.061, abs=5e-4)
  nsa = _config('nsa')
  nsa['model']['num_kv_heads'] = 2  # attention_nsa.py: with GQA's 2 groups, +5.8%
  assert _params(nsa) / gqa - 1 == pytest.approx(0.058, abs=5e-4)


@pytest.mark.parametrize('size, byte_vocab, qwen_vocab', [
    ('0.5b', 0.358e9, 0.494e9), ('1.5b', 1.311e9, 1.544e9), ('3b', 2.776e9, 3.086e9)])
def test_qwen_shapes_as_documented(size, byte_vocab, qwen_vocab):
  from configs import qwen2p5
  c = qwen2p5.get_config(None, size).to_dict()
  assert _params(c) == pytest.approx(byte_vocab, rel=1e-3)
  c['model']['vocab_size'] = 151936  # Qwen2.5's tokenizer
  assert _params(c) == pytest.approx(qwen_vocab, rel=1e-3)


def test_mla_7b_as_documented():
  from configs import mla_7b
  c = mla_7b.get_config().to_dict()
  cfg = ModelConfig.from_config(c['model'], tokenizer_vocab_size=BYTE_VOCAB)
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)['params']
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(params) == pytest.approx(6.92e9, rel=1e-3)
  layers = params['blocks']
  assert size(layers['attn']) / 32 == pytest.approx(39.1e6, rel=2e-3)  # per layer
  assert size(layers['mlp']) / 32 == pytest.approx(151.0e6, rel=2e-3)


def test_nsa_smoke_trains_through_the_kernels_to_the_reference_losses(tmp_path):
  """configs/attention_nsa.py:smoke with model.nsa.implementation='interpret' (kernels/nsa's
  Triton kernels in Pallas' interpreter, forward and backward, in the jitted training step)
  against 'reference': the same losses after 6 float32 steps, to 1e-4 (the kernels sum their
  softmax in another order), and the record names the implementation."""
  records = {}
  for impl in ('interpret', 'reference'):
    proc = _main('--config=configs/attention_nsa.py:smoke', f'--workdir={tmp_path / impl}',
                 '--config.train.checkpoint_every=0', f'--config.model.nsa.implementation={impl}')
    assert proc.returncode == 0, proc.stderr
    (records[impl],) = read_records(tmp_path / impl / 'results.jsonl')
    assert records[impl]['config']['model']['nsa']['implementation'] == impl
    assert records[impl]['model']['attention']['implementation'] == impl  # what ran
  got, want = records['interpret']['quality'], records['reference']['quality']
  losses = [k for k, v in want.items() if 'loss' in k and isinstance(v, float)]
  assert {'eval_loss', 'initial_eval_loss'} <= set(losses), want
  for key in losses:
    assert got[key] == pytest.approx(want[key], rel=1e-4), key
  assert got['eval_loss'] < got['initial_eval_loss']
