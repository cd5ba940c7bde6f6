"""Config validation: each bad config fails before anything is built, naming field and fix."""

import pytest

from configs import base, quickstart
from experiments import validate


def _errors(overrides, *, num_devices=1, process_count=1, backend='cpu', preset='smoke'):
  c = quickstart.get_config(preset).to_dict()
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = c
    for p in parents:
      node = node.setdefault(p, {})
    node[key] = value
  return validate.check(c, num_devices=num_devices, process_count=process_count, backend=backend)


def test_shipped_configs_are_valid():
  for preset in (None, 'smoke'):
    assert _errors({}, preset=preset) == []
  assert validate.check(base.get_config(), num_devices=8, process_count=1, backend='gpu') == []


BAD = [
    # (overrides, device facts, field, phrase in the message)
    ({'model.num_layer': 3}, {}, 'model.num_layer', "did you mean 'model.num_layers'"),
    ({'train.learning_rate': 'fast'}, {}, 'train.learning_rate', 'expects float'),
    ({'model.num_heads': 2.5}, {}, 'model.num_heads', 'expects int'),
    ({'model.scan_layers': 1}, {}, 'model.scan_layers', 'expects bool'),
    ({'model.attention': 'flash'}, {}, 'model.attention', 'valid values: gqa, mha'),
    ({'model.num_kv_heads': 2}, {}, 'model.attention', "is GQA; set model.attention='gqa'"),
    ({'model.num_kv_heads': 1}, {}, 'model.attention', "is MQA; set model.attention='mqa'"),
    ({'model.attention': 'gqa'}, {}, 'model.num_kv_heads', "'gqa' needs the number of K/V"),
    ({'model.sliding_window': 0}, {}, 'model.sliding_window', 'at least 1 key'),
    ({'model.ffn': 'sparse'}, {}, 'model.ffn', 'valid values: dense, moe'),
    ({'model.ffn': 'moe', 'model.moe.router': 'hash'}, {}, 'model.moe.router',
     'valid values: sigmoid, softmax'),
    ({'model.ffn': 'moe', 'model.moe.dispatch': 'sorted'}, {}, 'model.moe.dispatch',
     'valid values: capacity, dense, dropless'),
    ({'model.ffn': 'moe', 'model.moe.grouped_matmul': 'cutlass'}, {},
     'model.moe.grouped_matmul', 'valid values: auto, autotune, ragged_dot'),
    ({'model.ffn': 'moe', 'model.moe.top_k': 9}, {}, 'model.moe.top_k', 'num_experts=8'),
    ({'model.ffn': 'moe', 'model.moe.num_groups': 3}, {}, 'model.moe.num_groups',
     'divide num_experts=8'),
    ({'model.ffn': 'moe', 'model.moe.first_dense_layers': 2}, {},
     'model.moe.first_dense_layers', "model.ffn='dense'"),
    ({'model.ffn': 'moe', 'model.moe.capacity_factor': 0.0}, {}, 'model.moe.capacity_factor',
     'must be positive'),
    ({'model.ffn': 'moe', 'mesh.expert': 3, 'mesh.fsdp': 1}, {'num_devices': 3}, 'mesh.expert',
     'num_experts=8'),
    ({'model.position': 'alibi'}, {}, 'model.position', 'valid values: absolute, learned, none'),
    ({'model.remat': 'some'}, {}, 'model.remat', 'dots_saveable, full, none'),
    ({'model.dtype': 'fp8'}, {}, 'model.dtype', 'bfloat16'),
    ({'kind': 'serve'}, {}, 'kind', 'valid values: finetune, inference, pretrain'),
    ({'model.num_heads': 6, 'model.num_kv_heads': 4, 'model.embed_dim': 96}, {},
     'model.num_kv_heads', 'does not divide model.num_heads=6'),
    ({'model.embed_dim': 66}, {}, 'model.head_dim', 'set model.head_dim'),
    ({'model.head_dim': 15}, {}, 'model.head_dim', 'must be even'),
    ({'model.num_layers': 0}, {}, 'model.num_layers', 'at least 1'),
    ({'train.global_batch_size': 6}, {'num_devices': 4}, 'train.global_batch_size',
     'use a multiple of 4'),
    ({'train.global_batch_size': 8, 'train.grad_accum_steps': 3}, {}, 'train.grad_accum_steps',
     'does not divide'),
    ({'train.global_batch_size': 8, 'train.grad_accum_steps': 2}, {'num_devices': 8},
     'train.global_batch_size', 'a micro-batch of 4 sequences'),
    ({'train.global_batch_size': 6}, {'process_count': 4, 'num_devices': 2},
     'train.global_batch_size', 'does not split over 4 processes'),
    ({'mesh.fsdp': 3}, {'num_devices': 8}, 'mesh', 'multiply to 3 devices but 8'),
    ({'mesh.data': -1}, {}, 'mesh.fsdp', 'only one mesh axis may be -1'),
    ({'mesh.tensor': 3}, {'num_devices': 8}, 'mesh.fsdp', 'does not divide the 8'),
    ({'mesh.tensor': 8, 'mesh.fsdp': 1}, {'num_devices': 8}, 'model.num_heads',
     'does not shard over mesh.tensor=8'),
    ({'model.attention_impl': 'cudnn'}, {}, 'model.attention_impl', 'needs an NVIDIA GPU'),
    ({'model.attention_impl': 'cudnn'}, {'backend': 'gpu'}, 'model.attention_impl',
     'runs in bfloat16'),
    ({'model.attention_impl': 'flash'}, {}, 'model.attention_impl', 'auto, cudnn, xla'),
    ({'data.eval_fraction': 1.0}, {}, 'data.eval_fraction', 'strictly between 0 and 1'),
    ({'train.warmup_steps': 6}, {}, 'train.warmup_steps', 'no room for decay'),
    ({'train.min_lr_ratio': 2.0}, {}, 'train.min_lr_ratio', 'must lie in [0, 1]'),
    ({'train.b2': 1.0}, {}, 'train.b2', 'must lie in [0, 1)'),
    ({'train.learning_rate': -1.0}, {}, 'train.learning_rate', 'must be positive'),
    ({'data.seq_len': None}, {}, 'data.seq_len', 'must be set'),
    ({'profile.steps': -1}, {}, 'profile.steps', 'at least 0'),
    ({'profile.steps': 4}, {}, 'profile.steps', 'leave no measured steps'),
    ({'metrics.sample_interval_s': 0.0}, {}, 'metrics.sample_interval_s', 'must be positive'),
    ({'metrics.peak_flops_per_s': -5.0}, {}, 'metrics.peak_flops_per_s', 'must be positive'),
]


@pytest.mark.parametrize('overrides, facts, field, phrase', BAD,
                         ids=[f'{i}-{b[2]}' for i, b in enumerate(BAD)])
def test_bad_config_names_field_and_fix(overrides, facts, field, phrase):
  errors = _errors(overrides, **facts)
  assert errors, 'the config was accepted'
  matching = [e for e in errors if e.field == field]
  assert matching, f'no error for {field}: {[str(e) for e in errors]}'
  assert any(phrase in e.message for e in matching), [e.message for e in matching]


def test_attention_variant_checks_its_own_shapes(monkeypatch):
  from efficientjax.attention import ATTENTION

  class Blocked:
    @staticmethod
    def check(model, seq_len):
      del model
      from efficientjax.errors import ConfigError
      return [ConfigError('data.seq_len', f'{seq_len} is not a multiple of 48')] if seq_len % 48 else []

  monkeypatch.setitem(ATTENTION._entries, 'blocked', Blocked)
  errors = _errors({'model.attention': 'blocked'})
  assert [e.field for e in errors] == ['data.seq_len']
  assert 'not a multiple of 48' in errors[0].message


def test_vocab_smaller_than_tokenizer():
  c = quickstart.get_config('smoke').to_dict()
  c['model']['vocab_size'] = 200
  errors = validate.check_tokenizer(c, 257)
  assert errors and errors[0].field == 'model.vocab_size' and '257' in errors[0].message


def test_schema_has_no_untyped_fields():
  # Every field must carry a type, or overrides on it could not be checked.
  assert all(t is not type(None) for t in validate.schema_paths().values())


def test_nsa_kernels_refused_for_fine_tuning_packed_rows():
  """Fine-tuning packs examples into rows, which kernels/nsa's kernels do not take: asked for by
  name, the run is refused before any compile; auto (the reference for packed rows) passes."""
  from configs import finetune_quickstart  # pylint: disable=g-import-not-at-top
  c = finetune_quickstart.get_config('smoke').to_dict()
  c['model'].update(attention='nsa', num_kv_heads=1)
  for impl, refused in (('interpret', True), ('triton', True), ('auto', False)):
    c['model']['nsa']['implementation'] = impl
    errors = [e for e in validate.check(c, num_devices=1, process_count=1, backend='cpu')
              if e.field == 'model.nsa.implementation']
    assert bool(errors) == refused, (impl, [str(e) for e in errors])
    if refused:
      assert 'packs examples into rows' in errors[0].message
