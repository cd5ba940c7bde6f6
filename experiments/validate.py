"""Checks a whole run config before anything is built or compiled.

Every problem is a `ConfigError` naming the field and the fix; `check` returns all of them so a
user fixes a config in one round.

Validation is by construction: the schema (configs/base.py) gives each field its type, `RULES`
gives each field its constraint (a range, a choice among a registry's keys, or explicitly none),
and `RELATIONS` hold the checks that read several fields. A relation runs only when every field
it reads passed its own rule, so no relation ever sees a value it could crash on (a zero head
count, a negative size). Where a message advises a concrete change, the error's `fix` holds it
as config overrides, and applying it passes the same check.
"""

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from ml_collections import ConfigDict

from configs import base
from efficientjax import parallel
from efficientjax.attention import ATTENTION, POSITIONS
from efficientjax.attention.core import IMPLEMENTATIONS
from efficientjax.attention.mha import gqa_kv_heads, kv_head_variant
from efficientjax.attention.nsa import COMPRESSIONS
from efficientjax.attention.nsa import IMPLEMENTATIONS as NSA_IMPLEMENTATIONS
from efficientjax.data import instructions
from efficientjax.data.corpora import parse_spec
from efficientjax.errors import ConfigError
from efficientjax.infer import workload
from efficientjax.model import DTYPES, REMAT_POLICIES, ModelConfig
from efficientjax.moe.dispatch import DISPATCH, GROUPED_MATMULS
from efficientjax.moe.router import ROUTERS
from efficientjax.nn import FFN
from efficientjax.peft import METHODS, FinetuneConfig
from efficientjax.quant import METHODS as QUANT_METHODS
from efficientjax.quant import PRECISIONS
from efficientjax.train import init_from
from efficientjax.train.execution import EXECUTIONS
from experiments.registry import EXPERIMENTS

_SCHEMA = base.get_config()
_INT64_MAX = 2**63 - 1  # JAX, numpy and orbax take integers as int64


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
    if isinstance(value, (Mapping, ConfigDict)):
      out.update(_leaves(value, prefix + key + '.'))
    else:
      out[prefix + key] = value
  return out


_SCHEMA_DEFAULTS = _leaves(_SCHEMA.to_dict())


# ---------------------------------------------------------------------------------------------
# Rules: the constraint on one field's value.


def _num(x: float) -> str:
  return f'{x:g}' if isinstance(x, float) else str(x)


class Rule:
  """A constraint on one field's value, which already has the schema's type (and is None only
  where the field may be unset)."""

  def problem(self, value: Any) -> str | None:
    """What is wrong with `value`, as the message, or None when nothing is."""
    raise NotImplementedError

  def fix(self, field: str, value: Any) -> dict[str, Any] | None:
    del field, value
    return None

  def error(self, field: str, value: Any, config: Mapping[str, Any]) -> ConfigError | None:
    """The error for `value`; `config` (whose other fields may be wrong too) only shapes the
    advice."""
    del config
    problem = self.problem(value)
    return None if problem is None else ConfigError(field, problem, self.fix(field, value))


class Free(Rule):
  """Any value of the schema's type (flags, free-form names)."""

  def problem(self, value):
    return None


@dataclasses.dataclass(frozen=True)
class Range(Rule):
  """lo <= value <= hi; either end may be open or absent. NaN lies in no range."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  unit: str = ''  # after the bound: 'must be at least 1 key'
  note: str = ''  # after the value: why, or a typical setting

  def contains(self, v) -> bool:
    if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
      return False
    return self.hi is None or bool(v < self.hi if self.hi_open else v <= self.hi)

  def describe(self) -> str:
    lo, hi = self.lo, self.hi
    if hi is None:
      if lo == 0 and self.lo_open:
        return 'must be positive'
      return f'must {"exceed" if self.lo_open else "be at least"} {_num(lo)}{self.unit}'
    if lo is None:
      return f'must be {"below" if self.hi_open else "at most"} {_num(hi)}{self.unit}'
    if self.lo_open and self.hi_open:
      return f'must lie strictly between {_num(lo)} and {_num(hi)}'
    return (f'must lie in {"(" if self.lo_open else "["}{_num(lo)}, {_num(hi)}'
            f'{")" if self.hi_open else "]"}')

  def problem(self, value):
    if self.contains(value):
      return None
    return f'{self.describe()}, got {value}' + (f' ({self.note})' if self.note else '')


def AtLeast(lo: float, unit: str = '', note: str = '') -> Range:  # pylint: disable=invalid-name
  return Range(lo, unit=unit, note=note)


def Positive(note: str = '') -> Range:  # pylint: disable=invalid-name
  return Range(0, lo_open=True, note=note)


@dataclasses.dataclass(frozen=True)
class Optional(Rule):
  """None (the placeholder's "derive it") or a value satisfying `rule`; the fix is to unset."""
  rule: Rule
  unset: str  # what None means: 'follow the tokenizer'

  def problem(self, value):
    if value is None:
      return None
    problem = self.rule.problem(value)
    return None if problem is None else f'{problem}; or unset it to {self.unset}'

  def fix(self, field, value):
    return {field: None}


class KVHeads(Optional):
  """model.num_kv_heads: unsetting it means num_heads (or 1 for 'mqa'), which 'gqa' cannot
  take, so there the advice is a GQA head count (or the variant the head count allows)."""

  def error(self, field, value, config):
    error = super().error(field, value, config)
    m = config.get('model')
    if error is None or not isinstance(m, Mapping) or m.get('attention') != 'gqa':
      return error
    heads = m.get('num_heads')
    valid = isinstance(heads, int) and not isinstance(heads, bool) and heads > 0
    counts = gqa_kv_heads(heads) if valid else []
    problem = self.rule.problem(value)
    if counts:
      return ConfigError(field, f"{problem}; attention 'gqa' needs a divisor of "
                         f'model.num_heads={heads} above 1 and below it, e.g. {counts[0]}',
                         {field: counts[0]})
    return ConfigError(field, f"{problem}; or unset it with model.attention='mha'",
                       {field: None, 'model.attention': 'mha'})


class OneOf(Rule):
  """One of a registry's keys (read when checked: registries grow as modules register) or of
  a fixed tuple, listed in its order."""

  def __init__(self, choices: Iterable[str]):
    self.choices = choices

  def _close(self, value) -> str | None:
    close = difflib.get_close_matches(str(value), list(self.choices), n=1, cutoff=0.75)
    return close[0] if close else None

  def problem(self, value):
    valid = list(self.choices)
    if value in valid:
      return None
    close = self._close(value)
    hint = f'; did you mean {close!r}?' if close else ''
    return f'unknown value {value!r}; valid values: {", ".join(valid)}{hint}'

  def fix(self, field, value):
    close = self._close(value)
    return {field: close} if close else None


class DeviceCount(Rule):
  """A mesh axis: a number of devices, or -1 for those the other axes leave."""

  def problem(self, value):
    if value >= 1 or value == -1:
      return None
    return f'must be a positive device count or -1, got {value}'


class WeightSource(Rule):
  """model.init: the form of a weight source (that it exists and fits is `resolve`'s check,
  which runs first in experiments.main)."""

  def problem(self, value):
    try:
      init_from.parse(value)
    except ConfigError as e:
      return e.message
    return None


class Corpus(Rule):
  """A corpus spec whose form is known (that its files exist is checked when they are read):
  plain documents for pretraining, prompt/answer examples for fine-tuning."""

  def problem(self, value, kind: str = 'pretrain'):
    try:
      (instructions.parse_spec if kind == 'finetune' else parse_spec)(value)
    except ConfigError as e:
      return e.message
    return None

  def error(self, field, value, config):
    problem = self.problem(value, config.get('kind'))
    return None if problem is None else ConfigError(field, problem)


ON_BAD_CHECKPOINT = ('fallback', 'fail')
EXPORTS = ('adapter', 'merged', 'none')  # finetune.export
ON_NONFINITE = ('stop', 'skip')

# Every field of configs/base.py and its constraint beyond its type (tests keep the two in step).
RULES: dict[str, Rule] = {
    'kind': OneOf(EXPERIMENTS),
    'seed': Range(0, _INT64_MAX),
    'execution': OneOf(EXECUTIONS),
    'study.name': Free(),
    'study.point': Free(),
    'study.axis': Free(),
    'study.repeat': Optional(AtLeast(0), 'not part of a sweep'),

    'model.vocab_size': Optional(Positive(), 'follow the tokenizer'),
    'model.embed_dim': AtLeast(1),
    'model.num_layers': AtLeast(1),
    'model.num_heads': AtLeast(1),
    'model.num_kv_heads': KVHeads(AtLeast(1), "use model.num_heads (1 for 'mqa')"),
    'model.head_dim': Optional(AtLeast(1), 'derive it as model.embed_dim // model.num_heads'),
    'model.mlp_dim': AtLeast(1),
    'model.init': Optional(WeightSource(), 'initialise at random'),
    'model.attention': OneOf(ATTENTION),
    'model.attention_impl': OneOf(sorted(IMPLEMENTATIONS)),
    'model.qkv_bias': Free(),
    'model.qk_norm': Free(),
    'model.sliding_window': Optional(AtLeast(1, unit=' key'), 'attend to the whole past'),
    'model.position': OneOf(POSITIONS),
    # YaRN's ramp divides by log(theta); below 1 the "frequencies" would exceed one turn a token.
    'model.rope_theta': Range(1.0, lo_open=True, note='Llama uses 10000, Qwen2.5 1e6'),
    'model.max_seq_len': Optional(AtLeast(1), 'follow data.seq_len'),
    'model.yarn.factor': AtLeast(1.0, note='1: plain RoPE; YaRN stretches the original context '
                                 'by this factor'),
    'model.yarn.original_max_len': AtLeast(1, note='the context length the model was trained at'),
    'model.yarn.beta_fast': Positive(note='rotations over the original context; the paper uses 32'),
    'model.yarn.beta_slow': Positive(note='rotations over the original context; the paper uses 1'),
    # Negative mscales can zero the denominator of DeepSeek's mscale ratio.
    'model.yarn.mscale': AtLeast(0.0, note='0 or 1: off'),
    'model.yarn.mscale_all_dim': AtLeast(0.0, note='0: off'),
    'model.yarn.truncate': Free(),
    'model.llama3_rope.factor': AtLeast(1.0, note='1: plain RoPE; Llama 3.1 uses 8, 3.2 32'),
    # Both divide original_max_len into the wavelengths bounding the smoothed band.
    'model.llama3_rope.low_freq_factor': Positive(note='Llama 3.1 uses 1'),
    'model.llama3_rope.high_freq_factor': Positive(note='Llama 3.1 uses 4'),
    'model.llama3_rope.original_max_len': AtLeast(1, note='the context length the model was '
                                                  'trained at'),
    'model.linear_rope_factor': AtLeast(1.0, note='1: plain RoPE; positions are interpolated '
                                        'by this factor'),
    'model.relative.num_buckets': AtLeast(2, unit=' buckets', note='half exact, half '
                                          'logarithmic; T5 uses 32'),
    'model.relative.max_distance': AtLeast(1, note='T5 uses 128'),
    'model.mla.q_lora_rank': AtLeast(0, note='0: queries projected directly'),
    'model.mla.kv_lora_rank': AtLeast(1),
    'model.mla.qk_nope_head_dim': AtLeast(1),
    'model.mla.qk_rope_head_dim': AtLeast(1),
    'model.mla.v_head_dim': AtLeast(1),
    'model.nsa.block_len': AtLeast(1),
    'model.nsa.stride': AtLeast(1),
    'model.nsa.select_block_len': AtLeast(1),
    'model.nsa.num_selected': AtLeast(1),
    'model.nsa.window': AtLeast(1),
    'model.nsa.compression': OneOf(COMPRESSIONS),
    'model.nsa.implementation': OneOf(NSA_IMPLEMENTATIONS),
    'model.ffn': OneOf(FFN),
    'model.moe.num_experts': AtLeast(1),
    'model.moe.top_k': AtLeast(1),
    'model.moe.expert_dim': Optional(AtLeast(1), 'use model.mlp_dim'),
    'model.moe.num_shared_experts': AtLeast(0),
    'model.moe.shared_expert_dim': Optional(AtLeast(1),
                                            'use num_shared_experts × model.moe.expert_dim'),
    'model.moe.shared_expert_gate': Free(),
    'model.moe.first_dense_layers': AtLeast(0),
    'model.moe.router': OneOf(ROUTERS),
    'model.moe.norm_topk_prob': Free(),
    'model.moe.routed_scaling_factor': Positive(note='DeepSeek-V2 uses 1 to 16'),
    'model.moe.num_groups': AtLeast(1),
    'model.moe.topk_groups': AtLeast(1),
    'model.moe.aux_loss_coef': AtLeast(0.0),
    'model.moe.z_loss_coef': AtLeast(0.0),
    'model.moe.seq_aux_loss_coef': AtLeast(0.0),
    'model.moe.aux_free': Free(),
    'model.moe.bias_update_rate': AtLeast(0.0),
    'model.moe.dispatch': OneOf(DISPATCH),
    'model.moe.capacity_factor': Positive(note='slots per expert over the even share'),
    'model.moe.grouped_matmul': OneOf(GROUPED_MATMULS),
    # An RMSNorm of a zero vector (padding) divides by sqrt(eps).
    'model.norm_eps': Positive(note='Llama uses 1e-5'),
    'model.tie_embeddings': Free(),
    'model.init_std': AtLeast(0.0),
    'model.param_dtype': OneOf(sorted(DTYPES)),
    'model.dtype': OneOf(sorted(DTYPES)),
    'model.scan_layers': Free(),
    'model.remat': OneOf(sorted(REMAT_POLICIES)),

    'inference.precision': OneOf(PRECISIONS),
    'inference.quant_method': OneOf(QUANT_METHODS),
    'inference.group_size': AtLeast(1, note='int4 groups of 32, 64 or 128 input features'),
    'inference.symmetric': Free(),
    'inference.quantize_lm_head': Free(),
    'inference.calibration_samples': AtLeast(1, note='AWQ and GPTQ use 128'),
    'inference.kv_cache_dtype': Optional(OneOf(sorted(DTYPES) + ['int8']),
                                         'use the compute dtype'),
    'inference.num_slots': AtLeast(1),
    'inference.max_len': AtLeast(2, note='prompt plus output tokens'),
    'inference.prefill_chunk': AtLeast(1),
    'inference.prompts': Free(),        # _inference_checks: corpus | jsonl:PATH
    'inference.num_requests': AtLeast(1),
    'inference.input_lengths': Free(),      # _inference_checks: the length grammar
    'inference.output_lengths': Free(),
    'inference.scenario': OneOf(workload.SCENARIOS),
    'inference.rate_per_s': Positive(note='mean arrivals per second'),
    'inference.stop_at_eos': Free(),
    'inference.temperature': AtLeast(0.0, note='0: greedy'),
    'inference.top_k': AtLeast(0, note='0: off'),
    'inference.top_p': Range(0, 1, lo_open=True, note='1: off'),
    'inference.eval_batches': AtLeast(1),
    'inference.eval_tasks': Free(),     # _inference_checks: the files exist
    'inference.eval_limit': Optional(AtLeast(1), 'every document of each task'),

    'data.corpus': Corpus(),

    'finetune.method': OneOf(METHODS),
    # Which names exist depends on the model: the method's own check (a relation) says.
    'finetune.target_modules': Free(),
    'finetune.rank': AtLeast(1, note='e.g. 8'),
    'finetune.alpha': Positive(note='lora_alpha, e.g. 16'),
    'finetune.dropout': Range(0, 1, hi_open=True),
    'finetune.init': Free(),  # the method's check: its choices depend on the method
    'finetune.lora_plus_ratio': Positive(note="B's rate over A's; LoRA+ suggests 16"),
    'finetune.freeze_layers': Free(),  # the method's check: in ±[1, num_layers]
    'finetune.freeze_modules': Free(),
    'finetune.freeze_extra': Free(),
    'finetune.base_dtype': Optional(OneOf(sorted(DTYPES)), 'keep model.param_dtype'),
    'finetune.export': OneOf(EXPORTS),
    'data.tokenizer': Free(),  # a path: read by check_run, through the tokenizer itself
    'data.eos_token': Free(),
    'data.seq_len': AtLeast(1),
    'data.eval_fraction': Range(0, 1, lo_open=True, hi_open=True),
    'data.max_documents': Optional(AtLeast(2, note='one to train on, one held out'),
                                   'read every document'),

    'train.steps': AtLeast(1),
    'train.global_batch_size': AtLeast(1),
    'train.grad_accum_steps': AtLeast(1),
    'train.learning_rate': Positive(),
    'train.warmup_steps': AtLeast(0),
    'train.min_lr_ratio': Range(0, 1),
    'train.weight_decay': AtLeast(0.0),
    'train.b1': Range(0, 1, hi_open=True),
    'train.b2': Range(0, 1, hi_open=True),
    'train.eps': Positive(note="Adam's denominator guard, e.g. 1e-8"),
    'train.grad_clip_norm': AtLeast(0.0, note='0 disables clipping'),
    'train.opt_state_dtype': OneOf(['bfloat16', 'float32']),
    'train.offload_optimizer': Free(),  # _offload_needs_host_memory
    'train.eval_every': AtLeast(0, note='0: only at the start and the end'),
    'train.eval_batches': AtLeast(1),
    'train.log_every': AtLeast(1),
    'train.checkpoint_every': AtLeast(0, note='0 disables checkpoints'),
    'train.keep_checkpoints': AtLeast(1),
    'train.async_checkpoint': Free(),
    'train.resume_step': Optional(AtLeast(0), 'resume from the newest good checkpoint'),
    'train.on_bad_checkpoint': OneOf(ON_BAD_CHECKPOINT),
    'train.on_nonfinite': OneOf(ON_NONFINITE),
    'train.max_skipped_steps': AtLeast(0),
    'train.timing_warmup_steps': AtLeast(0),

    'metrics.sample_interval_s': Positive(note='seconds, e.g. 0.1'),
    'metrics.peak_flops_per_s': Optional(Positive(note='FLOP/s per device'), 'use the table in '
                                         'efficientjax/metrics/peaks.py'),
    'metrics.peak_bandwidth_bytes_per_s': Optional(Positive(note='bytes/s per device'), 'use the '
                                                   'table in efficientjax/metrics/peaks.py'),
    'profile.steps': AtLeast(0),
    'mesh.data': DeviceCount(),
    'mesh.fsdp': DeviceCount(),
    'mesh.tensor': DeviceCount(),
    'mesh.expert': DeviceCount(),
}


# ---------------------------------------------------------------------------------------------
# Relations: checks that read several fields.


@dataclasses.dataclass(frozen=True)
class Facts:
  """The machine a config is checked for."""
  num_devices: int
  process_count: int
  backend: str


@dataclasses.dataclass(frozen=True)
class Relation:
  """`check(config, facts)`; skipped while any field in `reads` (or under a section named
  there) has an error, so it only ever sees values that passed their rules."""
  reads: tuple[str, ...]
  check: Callable[[dict[str, Any], Facts], list[ConfigError]]


RELATIONS: list[Relation] = []


def _relation(*reads: str):
  def add(fn):
    RELATIONS.append(Relation(reads, fn))
    return fn
  return add


@_relation('train.offload_optimizer')
def _offload_needs_host_memory(c, facts):
  del facts
  if not c['train']['offload_optimizer']:
    return []
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  kinds = {m.kind for m in device.addressable_memories()}
  if 'pinned_host' in kinds:
    return []
  return [ConfigError('train.offload_optimizer', f'{device.platform} devices here have no '
                      f'pinned_host memory (only {", ".join(sorted(kinds))}) to offload to; '
                      'set it to False', {'train.offload_optimizer': False})]


def _kv_heads(m: Mapping[str, Any]) -> int:
  """model.num_kv_heads as the model resolves it (ModelConfig.from_config)."""
  if m['num_kv_heads'] is not None:
    return m['num_kv_heads']
  return 1 if m['attention'] == 'mqa' else m['num_heads']


def _divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@_relation('model.num_heads', 'model.num_kv_heads', 'model.attention')
def _kv_heads_divide_heads(c, facts):
  del facts
  m = c['model']
  kv, heads = _kv_heads(m), m['num_heads']
  if heads % kv == 0 or m['attention'] == 'mla':  # MLA takes no K/V head count: its own check
    return []
  want = _divisor_at_most(heads, kv)
  fix = {'model.num_kv_heads': want}
  if m['attention'] in ('mha', 'gqa', 'mqa'):
    fix['model.attention'] = kv_head_variant(heads, want)
  return [ConfigError('model.num_kv_heads', f'{kv} does not divide model.num_heads={heads}; each '
                      f'K/V head must serve a whole group of query heads (e.g. {want})', fix)]


@_relation('model.head_dim', 'model.embed_dim', 'model.num_heads')
def _head_dim_derives(c, facts):
  del facts
  m = c['model']
  if m['head_dim'] is not None or m['embed_dim'] % m['num_heads'] == 0:
    return []
  even = max(2, m['embed_dim'] // m['num_heads'] // 2 * 2)  # even: RoPE rotates pairs
  return [ConfigError('model.head_dim', f'unset, and model.embed_dim={m["embed_dim"]} does not '
                      f'divide by model.num_heads={m["num_heads"]}; set model.head_dim (e.g. '
                      f'{even}) or change the head count', {'model.head_dim': even})]


_ROPE_SCALINGS = ('model.yarn.factor', 'model.llama3_rope.factor', 'model.linear_rope_factor')


@_relation(*_ROPE_SCALINGS)
def _one_rope_scaling(c, facts):
  """Each scaling replaces RoPE's frequencies, so two cannot both apply."""
  del facts
  leaves = _leaves(c)
  factors = {f: leaves[f] for f in _ROPE_SCALINGS}
  on = [f for f, factor in factors.items() if factor > 1.0]
  if len(on) < 2:
    return []
  kept, dropped = on[0], on[-1]
  return [ConfigError(dropped, f'{factors[dropped]:g} and {kept}={factors[kept]:g} both rescale '
                      "RoPE's frequencies, and only one scaling can apply; set "
                      f'{dropped}=1 to keep {kept}, or the other way round', {dropped: 1.0})]


@_relation('model.attention_impl', 'model.dtype')
def _cudnn_runs(c, facts):
  m = c['model']
  if m['attention_impl'] != 'cudnn':
    return []
  fix = {'model.attention_impl': 'auto'}
  if facts.backend != 'gpu':
    return [ConfigError('model.attention_impl', f"'cudnn' needs an NVIDIA GPU, this backend is "
                        f"{facts.backend}; use 'auto' or 'xla'", fix)]
  if m['dtype'] == 'float32':
    return [ConfigError('model.attention_impl', "cuDNN flash attention runs in bfloat16/float16; "
                        "set model.dtype or use 'auto'", fix)]
  return []


@_relation('model', 'data.seq_len')
def _variant_checks(c, facts):
  """Variant- and encoding-specific shapes: each registry entry may check its own."""
  del facts
  m, errors = c['model'], []
  for registry, name in ((ATTENTION, m['attention']), (POSITIONS, m['position']),
                         (FFN, m['ffn'])):
    entry_check = getattr(registry.get(name), 'check', None)
    if entry_check is not None:
      errors.extend(entry_check(m, c['data']['seq_len']))
  return errors


def _structure(c) -> ModelConfig | None:
  """The config's model for checks that read its structure (a method's targets, a precision's
  group sizes), with a stand-in vocabulary when the tokenizer decides it; None when the model
  section does not build (its own rules and relations report why)."""
  m = dict(c['model'])
  if m.get('vocab_size') is None:
    m['vocab_size'] = 256  # the structure, not the vocabulary, is what the checks read
  try:
    return ModelConfig.from_config(m, seq_len=c['data']['seq_len'])
  except (TypeError, ValueError):
    return None


@_relation('kind', 'model', 'finetune', 'data.seq_len')
def _finetune_method_checks(c, facts):
  """The method's own checks against the model's shape (LoRA's targets and rank, freeze's
  layers and modules, the initialisation): only for fine-tuning runs."""
  del facts
  if c['kind'] != 'finetune':
    return []
  cfg = _structure(c)
  if cfg is None:
    return []  # the model's own rules and relations report it
  ft = FinetuneConfig.from_config(c['finetune'])
  return METHODS.get(ft.method)(cfg, ft).check()


@_relation('kind', 'model.attention', 'model.nsa.implementation')
def _nsa_kernels_take_no_packed_rows(c, facts):
  """Fine-tuning packs several examples into each row (segment_ids), which kernels/nsa's
  kernels do not take: with them asked for by name the run would fail at its first trace."""
  del facts
  m = c['model']
  if (c['kind'] != 'finetune' or m['attention'] != 'nsa'
      or m['nsa']['implementation'] not in ('triton', 'interpret')):
    return []
  return [ConfigError('model.nsa.implementation', f"{m['nsa']['implementation']!r}: fine-tuning "
                      'packs examples into rows, which the NSA kernels do not take; use auto '
                      '(the reference for packed rows) or reference',
                      {'model.nsa.implementation': 'auto'})]


@_relation('kind', 'model', 'inference', 'data', 'seed')
def _inference_checks(c, facts):
  """What an inference run needs of its workload, precision and engine (kind 'inference')."""
  if c['kind'] != 'inference':
    return []
  inf, d = c['inference'], c['data']
  if (inf['precision'] == 'fp16' and facts.backend == 'cpu'
      and c['model']['attention'] in ('mla', 'nsa')):
    # Their scores are fp16 x fp16 -> f32 dots, which XLA's CPU backend does not have.
    return [ConfigError('inference.precision', f"fp16 {c['model']['attention']} attention does "
                        "not run on a CPU (XLA's CPU dot has no fp16 inputs with f32 "
                        "accumulation); use bf16 here, or a GPU", {'inference.precision': 'bf16'})]
  prompts = inf['prompts'] or d['corpus']
  jsonl = prompts.startswith('jsonl:')
  errors = workload.workload_errors(
      prompts=prompts, num_requests=inf['num_requests'], output_lengths=inf['output_lengths'],
      input_lengths=None if jsonl else inf['input_lengths'], scenario=inf['scenario'],
      rate_per_s=inf['rate_per_s'], seed=c['seed'], eval_fraction=d['eval_fraction'])
  cfg = _structure(c)
  if cfg is None:
    return errors  # the model's own rules and relations report it
  from efficientjax import quant  # pylint: disable=g-import-not-at-top
  errors += quant.check(cfg, precision=inf['precision'], method=inf['quant_method'],
                        group_size=inf['group_size'], symmetric=inf['symmetric'],
                        has_calibration=True, quantize_lm_head=inf['quantize_lm_head'])
  if not errors and not jsonl:
    longest_in = workload.parse_lengths(inf['input_lengths'], 'inference.input_lengths').bounds[1]
    longest_out = workload.parse_lengths(inf['output_lengths'],
                                         'inference.output_lengths').bounds[1]
    if longest_in and longest_out and longest_in + longest_out > inf['max_len']:
      errors.append(ConfigError('inference.max_len', f'{inf["max_len"]} tokens cannot hold the '
                                f'longest request ({longest_in} prompt + {longest_out} output '
                                'tokens); raise it or shorten the lengths',
                                {'inference.max_len': longest_in + longest_out}))
  if cfg.position == 'learned' and inf['max_len'] > cfg.max_seq_len:
    errors.append(ConfigError('inference.max_len', f'{inf["max_len"]} is beyond the learned '
                              f'position table\'s {cfg.max_seq_len} rows; lower it',
                              {'inference.max_len': cfg.max_seq_len}))
  from efficientjax.data.mc_tasks import OFFLINE_TASKS  # pylint: disable=g-import-not-at-top
  from efficientjax.infer import multiple_choice  # pylint: disable=g-import-not-at-top
  for task in (t.strip() for t in inf['eval_tasks'].split(',')):
    if not task or task in OFFLINE_TASKS:
      continue
    if not os.path.isfile(task):
      errors.append(ConfigError('inference.eval_tasks', f'{task} is not a file (an lm-eval task '
                                'YAML) nor an offline task ('
                                f'{", ".join(OFFLINE_TASKS)}); give those, comma-separated'))
      continue
    try:  # its format, its data and what the evaluator supports, before anything is computed
      multiple_choice.load_task(task)
    except ConfigError as e:
      errors.append(ConfigError('inference.eval_tasks', f'{task}: {e.message}'))
  if c['model']['ffn'] == 'moe' and c['model']['moe']['dispatch'] == 'capacity':
    # Capacity is shared by the tokens of a batch: an empty slot's or a prefill's padding would
    # take it from real requests, so a request's tokens would depend on the others'.
    errors.append(ConfigError('model.moe.dispatch', "'capacity' drops tokens by what else is in "
                              "the batch, which serving must not do; use 'dropless' (or 'dense')",
                              {'model.moe.dispatch': 'dropless'}))
  return errors


@_relation('data.tokenizer', 'data.eos_token')
def _byte_tokenizer_has_its_eos(c, facts):
  del facts
  d = c['data']
  if d['tokenizer'] == 'byte' and d['eos_token'] is not None:
    return [ConfigError('data.eos_token', f'{d["eos_token"]!r} was given but the byte tokenizer '
                        'has a fixed eos id; leave data.eos_token unset, or use a tokenizer.json',
                        {'data.eos_token': None})]
  return []


@_relation('train.steps', 'train.timing_warmup_steps', 'profile.steps')
def _measured_steps_remain(c, facts):
  del facts
  steps, warm, prof = c['train']['steps'], c['train']['timing_warmup_steps'], c['profile']['steps']
  if steps > warm + prof:
    return []
  fix = ({'profile.steps': steps - 1 - warm} if steps - 1 >= warm else
         {'profile.steps': 0, 'train.timing_warmup_steps': steps - 1})
  return [ConfigError('profile.steps', f'train.timing_warmup_steps + profile.steps = '
                      f'{warm + prof} leave no measured steps out of train.steps={steps}; lower '
                      'them', fix)]


@_relation('execution')
def _eager_runs_in_one_process(c, facts):
  """Eager steps across processes were tried (2 CPU processes x 4 devices, gloo) and hung in
  the first train step, idle for minutes, where one process on 8 devices takes under a second:
  op-by-op dispatch gives every primitive its own cross-process program. Meshes of one
  process's devices, Pallas kernels, shard_map, profiling and offloading all run eagerly."""
  if c['execution'] != 'eager' or facts.process_count == 1:
    return []
  return [ConfigError('execution', f"'eager' runs in one process, and this job has "
                      f'{facts.process_count}: op-by-op steps deadlock across processes; use '
                      "'jit', or run eager on one process's devices", {'execution': 'jit'})]


@_relation('execution', 'kind', 'train.timing_warmup_steps')
def _eager_warms_up(c, facts):
  """An eager step compiles its primitives the first time it runs (nothing is compiled ahead
  of time), so an untimed step must take those compiles out of the timings. Inference's
  engine always warms up before its window."""
  del facts
  if c['execution'] != 'eager' or c['kind'] == 'inference' or c['train']['timing_warmup_steps']:
    return []
  return [ConfigError('train.timing_warmup_steps', "0 with execution='eager' would time the "
                      'first step, in which XLA compiles each of its primitives; leave at least '
                      'one step untimed', {'train.timing_warmup_steps': 1})]


@_relation('train.warmup_steps', 'train.steps')
def _warmup_leaves_decay(c, facts):
  del facts
  t = c['train']
  if t['warmup_steps'] < t['steps'] or t['steps'] <= 1:
    return []
  return [ConfigError('train.warmup_steps', f'{t["warmup_steps"]} warm-up steps leave no room '
                      f'for decay in train.steps={t["steps"]}; lower it',
                      {'train.warmup_steps': t['steps'] // 10})]


@_relation('train.resume_step', 'train.checkpoint_every')
def _resume_needs_checkpoints(c, facts):
  del facts
  t = c['train']
  if t['resume_step'] is None or t['checkpoint_every'] > 0:
    return []
  return [ConfigError('train.resume_step', f'{t["resume_step"]} names a checkpoint, but '
                      'train.checkpoint_every=0 turns checkpoints off; unset it or turn them on',
                      {'train.resume_step': None})]


_DEFAULT_MESH = {a: _SCHEMA_DEFAULTS[f'mesh.{a}'] for a in parallel.MESH_AXES}


def _mesh_fix(mesh: Mapping[str, int], num_devices: int, **changes: int) -> dict[str, int]:
  """`changes` to the mesh, and what then fits it to the devices (one axis taking the rest,
  or at worst the default mesh), as overrides."""
  new = {a: mesh[a] for a in parallel.MESH_AXES} | changes
  free = next(a for a in ('fsdp', 'data', 'tensor', 'expert') if a not in changes)
  rest = {a: 1 if n == -1 else n for a, n in new.items()} | {free: -1}
  for candidate in (new, rest, _DEFAULT_MESH | changes, _DEFAULT_MESH):
    try:
      parallel.mesh_shape(candidate, num_devices)
    except ConfigError:
      continue
    return {f'mesh.{a}': n for a, n in candidate.items() if n != mesh[a]}
  raise AssertionError('the default mesh fits any device count')


def _mesh_sizes(c, facts) -> dict[str, int]:
  return parallel.mesh_shape(c['mesh'], facts.num_devices)


@_relation('mesh')
def _mesh_fits(c, facts):
  try:
    _mesh_sizes(c, facts)
  except ConfigError as e:
    changes = {}
    if 'only one mesh axis may be -1' in e.message:
      changes = {e.field.split('.')[1]: 1}
    return [ConfigError(e.field, e.message, _mesh_fix(c['mesh'], facts.num_devices, **changes))]
  return []


def _multiple_above(n: int, step: int) -> int:
  return -(-n // step) * step


@_relation('mesh', 'train.global_batch_size', 'train.grad_accum_steps')
def _batch_splits(c, facts):
  """Micro-batches of whole sequences, split evenly over the data-parallel devices and over the
  processes (each reads its own rows)."""
  sizes = _mesh_sizes(c, facts)
  batch, accum = c['train']['global_batch_size'], c['train']['grad_accum_steps']
  if batch % accum:
    want = _divisor_at_most(batch, accum)
    return [ConfigError('train.grad_accum_steps', f'{accum} does not divide '
                        f'train.global_batch_size={batch} into equal micro-batches (e.g. {want})',
                        {'train.grad_accum_steps': want})]
  shards, processes = sizes['data'] * sizes['fsdp'] * sizes['expert'], facts.process_count
  fix = {'train.global_batch_size': _multiple_above(batch, math.lcm(shards * accum, processes))}
  if (batch // accum) % shards:
    return [ConfigError('train.global_batch_size', f'a micro-batch of {batch // accum} sequences '
                        f'does not split over the {shards} data-parallel devices (mesh.data x '
                        f'mesh.fsdp x mesh.expert); use a multiple of {shards * accum}', fix)]
  if batch % processes:
    return [ConfigError('train.global_batch_size', f'{batch} does not split over {processes} '
                        f'processes; use a multiple of {processes}', fix)]
  return []


@_relation('mesh', 'model.ffn', 'model.moe.num_experts')
def _experts_shard(c, facts):
  ep = _mesh_sizes(c, facts)['expert']
  experts = c['model']['moe']['num_experts']
  if ep == 1 or c['model']['ffn'] != 'moe' or experts % ep == 0:
    return []
  want = math.gcd(experts, ep)
  return [ConfigError('mesh.expert', f'{ep} devices cannot hold an equal share of '
                      f'model.moe.num_experts={experts}; use a divisor (e.g. {want})',
                      _mesh_fix(c['mesh'], facts.num_devices, expert=want))]


@_relation('mesh', 'model.num_heads', 'model.num_kv_heads', 'model.attention', 'model.mlp_dim',
           'model.ffn', 'model.moe.expert_dim', 'model.moe.shared_expert_dim')
def _tensor_shards(c, facts):
  """Every weight axis the rules put on `tensor` (efficientjax/parallel/mesh.py) must divide."""
  tp, m, errors = _mesh_sizes(c, facts)['tensor'], c['model'], []
  if tp == 1:
    return []
  fix = _mesh_fix(c['mesh'], facts.num_devices, tensor=1)
  sizes = [('model.num_heads', m['num_heads']), ('model.num_kv_heads', _kv_heads(m)),
           ('model.mlp_dim', m['mlp_dim'])]
  if m['ffn'] == 'moe':
    sizes.append(('model.moe.expert_dim', m['moe']['expert_dim'] or m['mlp_dim']))
    if m['moe']['shared_expert_dim'] is not None:  # the shared MLP's width, sharded like mlp_dim
      sizes.append(('model.moe.shared_expert_dim', m['moe']['shared_expert_dim']))
  for field, value in sizes:
    if value % tp:
      errors.append(ConfigError(field, f'{value} does not shard over mesh.tensor={tp}; use a '
                                f'multiple of {tp} or a smaller tensor axis', fix))
  return errors


# ---------------------------------------------------------------------------------------------
# The checks.


def _type_error(path: str, value: Any, expected: type) -> ConfigError | None:
  if expected is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif expected is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok = isinstance(value, expected)
  if not ok:
    return ConfigError(path, f'expects {expected.__name__}, got {type(value).__name__} {value!r}')
  if expected is float and not math.isfinite(value):
    return ConfigError(path, f'must be a finite number, got {value}')
  if expected is int and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
    return ConfigError(path, f'{value} does not fit in a 64-bit integer')
  return None


def _check_fields(config: Mapping[str, Any]) -> list[ConfigError]:
  """Unknown, missing, unset and mistyped fields, then each field's rule."""
  leaves = _leaves(config)
  errors = [unknown_field_error(path) for path in leaves if path not in _SCHEMA_DEFAULTS]
  for path, expected in schema_paths().items():
    default = _SCHEMA_DEFAULTS[path]
    if path not in leaves:
      errors.append(ConfigError(path, 'missing; a run config has every field of configs/base.py '
                                '(start from base.get_config())', {path: default}))
      continue
    value = leaves[path]
    if value is None:
      if default is not None:
        errors.append(ConfigError(path, f'must be set (a {expected.__name__}); the default is '
                                  f'{default!r}', {path: default}))
        continue
    else:
      error = _type_error(path, value, expected)
      if error is not None:
        errors.append(error)
        continue
    error = RULES[path].error(path, value, config)
    if error is not None:
      errors.append(error)
  return errors


def _blocked(reads: tuple[str, ...], bad: set[str]) -> bool:
  return any(f == r or f.startswith(r + '.') or r.startswith(f + '.') for r in reads for f in bad)


def check(config: Mapping[str, Any], *, num_devices: int | None = None,
          process_count: int | None = None, backend: str | None = None) -> list[ConfigError]:
  """All problems with a run config (empty when it can run). The device facts default to this
  machine's; tests pass them to check configs meant for other machines."""
  # Nested plain dicts, whatever mix of dicts and ConfigDicts the config is.
  c = (config.to_dict() if isinstance(config, ConfigDict)
       else init_from.leaves_to_tree(_leaves(config)))
  errors = _check_fields(c)
  facts = Facts(jax.device_count() if num_devices is None else num_devices,
                jax.process_count() if process_count is None else process_count,
                backend or jax.default_backend())
  for relation in RELATIONS:
    if not _blocked(relation.reads, {e.field for e in errors}):
      try:
        errors.extend(relation.check(c, facts))
      except ConfigError as e:  # a check written to raise (efficientjax.moe.router.check)
        errors.append(e)
  return errors


def check_tokenizer(config: Mapping[str, Any], tokenizer_vocab_size: int, *,
                    num_devices: int | None = None) -> list[ConfigError]:
  """Checks that need the tokenizer (cheap to build: no corpus is read), for a config that
  passed `check` (`num_devices` as there)."""
  vocab = config['model']['vocab_size']
  if vocab is not None and vocab < tokenizer_vocab_size and config['model'].get('init'):
    # The source fixes the vocabulary: the tokenizer must be one its embedding was trained on.
    return [ConfigError('model.init', f'{config["model"]["init"]} has a vocabulary of {vocab} '
                        f'tokens, fewer than this run\'s tokenizer ({tokenizer_vocab_size}); use '
                        'the tokenizer the source was trained with (data.tokenizer)')]
  if vocab is not None and vocab < tokenizer_vocab_size:
    return [ConfigError('model.vocab_size', f'{vocab} is smaller than the tokenizer\'s '
                        f'{tokenizer_vocab_size} tokens; raise it or leave it unset',
                        {'model.vocab_size': None})]
  model = ModelConfig.from_config(config['model'], tokenizer_vocab_size=tokenizer_vocab_size,
                                  seq_len=config['data']['seq_len'])
  num_devices = jax.device_count() if num_devices is None else num_devices
  tp = parallel.mesh_shape(config['mesh'], num_devices)['tensor']
  if tp > 1 and model.vocab_size % tp:
    return [ConfigError('model.vocab_size', f'{model.vocab_size} does not shard over '
                        f'mesh.tensor={tp}; use a multiple of {tp}',
                        {'model.vocab_size': _multiple_above(model.vocab_size, tp)})]
  return []


def check_workdir(workdir: str) -> list[ConfigError]:
  """A --workdir the run can use: a directory it may write in, or a path it can create."""
  path = os.path.abspath(workdir)
  if os.path.lexists(path) and not os.path.exists(path):
    return [ConfigError('--workdir', f'{workdir} is a broken symbolic link; remove it or choose '
                        'another directory')]
  if os.path.exists(path):
    if not os.path.isdir(path):
      return [ConfigError('--workdir', f'{workdir} is an existing file, not a directory; choose '
                          'another path')]
    if not os.access(path, os.W_OK | os.X_OK):
      return [ConfigError('--workdir', f'{workdir} is not writable; choose a directory you can '
                          'write in')]
    return []
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return [ConfigError('--workdir', f'cannot create {workdir}: {parent} is a file, not a '
                        'directory; choose another path')]
  if not os.access(parent, os.W_OK | os.X_OK):
    return [ConfigError('--workdir', f'cannot create {workdir}: no permission to write in '
                        f'{parent}; choose a directory you can write in')]
  return []


def check_run(config: Mapping[str, Any], workdir: str | None = None, **facts: Any
              ) -> list[ConfigError]:
  """Everything `experiments.main` checks before building anything: the config (`check`, with
  the device facts `facts`), then what needs its tokenizer, and the workdir."""
  errors = check(config, **facts)
  if not errors:
    c = config.to_dict() if isinstance(config, ConfigDict) else config
    from efficientjax.data import get_tokenizer  # pylint: disable=g-import-not-at-top
    try:
      tokenizer = get_tokenizer(c['data']['tokenizer'], eos_token=c['data']['eos_token'])
      errors = check_tokenizer(c, tokenizer.vocab_size, num_devices=facts.get('num_devices'))
    except ConfigError as e:
      errors = [e]
  if workdir is not None:
    errors += check_workdir(workdir)
  return errors
