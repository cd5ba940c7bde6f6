"""Checks a whole run config before anything is built or compiled.

Every problem is a `ConfigError` naming the field and the fix; `check` returns all of them so a
user fixes a config in one round.
"""

import difflib
from collections.abc import Mapping
from typing import Any

import jax
from ml_collections import ConfigDict

from configs import base
from efficientjax import parallel
from efficientjax.attention import ATTENTION, POSITIONS
from efficientjax.attention.core import IMPLEMENTATIONS
from efficientjax.errors import ConfigError
from efficientjax.model import DTYPES, REMAT_POLICIES, ModelConfig
from efficientjax.nn import FFN
from experiments.registry import EXPERIMENTS

_SCHEMA = base.get_config()


def schema_paths(schema: ConfigDict = _SCHEMA, prefix: str = '') -> dict[str, type]:
  """Every leaf field of the schema with its type."""
  out = {}
  for key in schema.keys():
    path = prefix + key
    value = schema[key]
    if isinstance(value, ConfigDict):
      out.update(schema_paths(value, path + '.'))
    else:
      out[path] = schema.get_type(key)
  return out


def unknown_field_error(path: str) -> ConfigError:
  close = difflib.get_close_matches(path, list(schema_paths()), n=1)
  hint = f'did you mean {close[0]!r}?' if close else 'see configs/base.py for every field'
  return ConfigError(path, f'unknown field; {hint}')


def _leaves(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update(_leaves(value, prefix + key + '.'))
    else:
      out[prefix + key] = value
  return out


def _type_ok(value: Any, expected: type) -> bool:
  if expected is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, expected)


def _check_fields(config: Mapping[str, Any]) -> list[ConfigError]:
  errors = []
  fields = schema_paths()
  for path, value in _leaves(config).items():
    if path not in fields:
      errors.append(unknown_field_error(path))
    elif value is not None and not _type_ok(value, fields[path]):
      errors.append(ConfigError(path, f'expects {fields[path].__name__}, got '
                                f'{type(value).__name__} {value!r}'))
    elif value is None and _SCHEMA_DEFAULTS[path] is not None:
      errors.append(ConfigError(path, f'must be set (a {fields[path].__name__}); the default '
                                f'is {_SCHEMA_DEFAULTS[path]!r}'))
  return errors


_SCHEMA_DEFAULTS = _leaves(_SCHEMA.to_dict())


def _choice(errors: list, field: str, value: Any, valid) -> None:
  if value not in valid:
    errors.append(ConfigError(field, f'unknown value {value!r}; valid values: '
                              f'{", ".join(sorted(valid))}'))


def _at_least(errors: list, c: Mapping[str, Any], field: str, low: float) -> None:
  section, key = field.split('.')
  if c[section][key] < low:
    errors.append(ConfigError(field, f'must be at least {low}, got {c[section][key]}'))


def check(config: Mapping[str, Any], *, num_devices: int | None = None,
          process_count: int | None = None, backend: str | None = None) -> list[ConfigError]:
  """All problems with a run config (empty when it can run). The device facts default to this
  machine's; tests pass them to check configs meant for other machines."""
  c = config.to_dict() if isinstance(config, ConfigDict) else dict(config)
  errors = _check_fields(c)
  if errors:  # the checks below assume every field exists with its type
    return errors
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  backend = backend or jax.default_backend()
  m, d, t = c['model'], c['data'], c['train']

  _choice(errors, 'kind', c['kind'], set(EXPERIMENTS))
  _choice(errors, 'model.attention', m['attention'], set(ATTENTION))
  _choice(errors, 'model.position', m['position'], set(POSITIONS))
  _choice(errors, 'model.ffn', m['ffn'], set(FFN))
  _choice(errors, 'model.attention_impl', m['attention_impl'], set(IMPLEMENTATIONS))
  _choice(errors, 'model.remat', m['remat'], set(REMAT_POLICIES))
  _choice(errors, 'model.dtype', m['dtype'], set(DTYPES))
  _choice(errors, 'model.param_dtype', m['param_dtype'], set(DTYPES))
  for field in ('model.embed_dim', 'model.num_layers', 'model.num_heads', 'model.mlp_dim',
                'data.seq_len', 'train.steps', 'train.global_batch_size',
                'train.grad_accum_steps', 'train.eval_batches', 'train.log_every',
                'train.keep_checkpoints'):
    _at_least(errors, c, field, 1)
  for field in ('train.warmup_steps', 'train.eval_every', 'train.checkpoint_every',
                'train.timing_warmup_steps', 'train.weight_decay', 'train.grad_clip_norm',
                'profile.steps'):
    _at_least(errors, c, field, 0)
  if errors:
    return errors

  # The model's shape.
  kv = m['num_kv_heads'] or m['num_heads']
  if m['num_heads'] % kv:
    errors.append(ConfigError('model.num_kv_heads', f'{kv} does not divide model.num_heads='
                              f'{m["num_heads"]}; each K/V head must serve a whole group of '
                              'query heads'))
  if m['head_dim'] is None and m['embed_dim'] % m['num_heads']:
    errors.append(ConfigError('model.head_dim', f'unset, and model.embed_dim={m["embed_dim"]} '
                              f'does not divide by model.num_heads={m["num_heads"]}; set '
                              'model.head_dim or change the head count'))
  if m['vocab_size'] is not None and m['vocab_size'] < 1:
    errors.append(ConfigError('model.vocab_size', 'must be positive, or unset to follow the '
                              'tokenizer'))
  if m['attention_impl'] == 'cudnn':
    if backend != 'gpu':
      errors.append(ConfigError('model.attention_impl', f"'cudnn' needs an NVIDIA GPU, this "
                                f"backend is {backend}; use 'auto' or 'xla'"))
    elif m['dtype'] == 'float32':
      errors.append(ConfigError('model.attention_impl', "cuDNN flash attention runs in "
                                "bfloat16/float16; set model.dtype or use 'auto'"))
  if m['sliding_window'] is not None and m['sliding_window'] < 1:
    errors.append(ConfigError('model.sliding_window', f'must be at least 1 key, got '
                              f'{m["sliding_window"]}; unset it for full attention'))
  # Variant- and encoding-specific shapes: each registry entry may check its own.
  for registry, name in ((ATTENTION, m['attention']), (POSITIONS, m['position']),
                         (FFN, m['ffn'])):
    if name in registry:
      entry_check = getattr(registry.get(name), 'check', None)
      if entry_check is not None:
        errors.extend(entry_check(m, d['seq_len']))

  # Data.
  if not 0 < d['eval_fraction'] < 1:
    errors.append(ConfigError('data.eval_fraction', f'must lie strictly between 0 and 1, got '
                              f'{d["eval_fraction"]}'))
  if d['max_documents'] is not None and d['max_documents'] < 2:
    errors.append(ConfigError('data.max_documents', 'needs at least 2 (one to train on, one '
                              'held out), or unset for all'))

  # Measurement.
  if c['metrics']['sample_interval_s'] <= 0:
    errors.append(ConfigError('metrics.sample_interval_s', 'must be positive (seconds), e.g. 0.1'))
  peak = c['metrics']['peak_flops_per_s']
  if peak is not None and peak <= 0:
    errors.append(ConfigError('metrics.peak_flops_per_s', 'must be positive (FLOP/s per device), '
                              'or unset to use the table in efficientjax/metrics/peaks.py'))
  if t['steps'] <= t['timing_warmup_steps'] + c['profile']['steps']:
    errors.append(ConfigError('profile.steps', f'train.timing_warmup_steps + profile.steps = '
                              f'{t["timing_warmup_steps"] + c["profile"]["steps"]} leave no '
                              f'measured steps out of train.steps={t["steps"]}; lower them'))

  # Optimisation.
  if t['learning_rate'] <= 0:
    errors.append(ConfigError('train.learning_rate', f'must be positive, got {t["learning_rate"]}'))
  if not 0 <= t['min_lr_ratio'] <= 1:
    errors.append(ConfigError('train.min_lr_ratio', f'must lie in [0, 1], got {t["min_lr_ratio"]}'))
  for field in ('b1', 'b2'):
    if not 0 <= t[field] < 1:
      errors.append(ConfigError(f'train.{field}', f'must lie in [0, 1), got {t[field]}'))
  if t['warmup_steps'] >= t['steps'] and t['steps'] > 1:
    errors.append(ConfigError('train.warmup_steps', f'{t["warmup_steps"]} warm-up steps leave '
                              f'no room for decay in train.steps={t["steps"]}; lower it'))

  # Batch and mesh.
  try:
    sizes = parallel.mesh_shape(c['mesh'], num_devices)
  except ConfigError as e:
    errors.append(e)
    return errors
  batch, accum = t['global_batch_size'], t['grad_accum_steps']
  if batch % accum:
    errors.append(ConfigError('train.grad_accum_steps', f'{accum} does not divide '
                              f'train.global_batch_size={batch} into equal micro-batches'))
  else:
    shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
    if (batch // accum) % shards:
      errors.append(ConfigError('train.global_batch_size', f'a micro-batch of {batch // accum} '
                                f'sequences does not split over the {shards} data-parallel '
                                f'devices (mesh.data x mesh.fsdp x mesh.expert); use a '
                                f'multiple of {shards * accum}'))
  if batch % process_count:
    errors.append(ConfigError('train.global_batch_size', f'{batch} does not split over '
                              f'{process_count} processes; use a multiple of {process_count}'))
  ep = sizes['expert']
  if ep > 1 and m['ffn'] == 'moe' and m['moe']['num_experts'] % ep:
    errors.append(ConfigError('mesh.expert', f'{ep} devices cannot hold an equal share of '
                              f'model.moe.num_experts={m["moe"]["num_experts"]}; use a divisor'))
  tp = sizes['tensor']
  if tp > 1:
    for field, value in (('model.num_heads', m['num_heads']), ('model.num_kv_heads', kv),
                         ('model.mlp_dim', m['mlp_dim'])):
      if value % tp:
        errors.append(ConfigError(field, f'{value} does not shard over mesh.tensor={tp}; use a '
                                  f'multiple of {tp} or a smaller tensor axis'))
  return errors


def check_tokenizer(config: Mapping[str, Any], tokenizer_vocab_size: int) -> list[ConfigError]:
  """Checks that need the tokenizer (cheap to build: no corpus is read)."""
  vocab = config['model']['vocab_size']
  if vocab is not None and vocab < tokenizer_vocab_size:
    return [ConfigError('model.vocab_size', f'{vocab} is smaller than the tokenizer\'s '
                        f'{tokenizer_vocab_size} tokens; raise it or leave it unset')]
  model = ModelConfig.from_config(config['model'], tokenizer_vocab_size=tokenizer_vocab_size,
                                  seq_len=config['data']['seq_len'])
  tp = config['mesh']['tensor']
  if tp > 1 and model.vocab_size % tp:
    return [ConfigError('model.vocab_size', f'{model.vocab_size} does not shard over '
                        f'mesh.tensor={tp}; use a multiple of {tp}')]
  return []
