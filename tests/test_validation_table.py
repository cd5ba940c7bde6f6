"""Config mistakes a new user makes: each exits 2 with one line naming the field, never a
traceback, and each piece of concrete advice (`ConfigError.fix`), once followed, validates.

Rows run through `validate.check_run`, what `experiments.main` calls before building anything;
a few go through the real command too. The sweep at the end checks the table's promise: no
value of any numeric field makes validation raise, and whatever validates builds.
"""

import ast
import dataclasses
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from configs import base, quickstart
from efficientjax.errors import ConfigError
from efficientjax.model import ModelConfig, Transformer
from experiments import main, validate
from tests.helpers import with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = {'num_devices': 1, 'process_count': 1, 'backend': 'cpu'}
BYTE_VOCAB = 257


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  """A copy of `config` with dotted overrides ('model.mla.kv_lora_rank': 8) set."""
  return with_overrides(config, overrides, new_keys=True)


def _smoke(**overrides: Any) -> dict[str, Any]:
  return _apply(quickstart.get_config('smoke').to_dict(), overrides)


# Variant bases at the smoke size, so their sections' fields are read.
MLA = {'model.attention': 'mla', 'model.mla.kv_lora_rank': 16, 'model.mla.qk_nope_head_dim': 8,
       'model.mla.qk_rope_head_dim': 8, 'model.mla.v_head_dim': 8}
NSA = {'model.attention': 'nsa', 'model.nsa.block_len': 8, 'model.nsa.stride': 4,
       'model.nsa.select_block_len': 8, 'model.nsa.num_selected': 2, 'model.nsa.window': 16}
MOE = {'model.ffn': 'moe', 'model.moe.expert_dim': 32}


@dataclasses.dataclass(frozen=True)
class Bad:
  overrides: dict[str, Any]
  field: str
  phrase: str
  facts: dict[str, Any] = dataclasses.field(default_factory=dict)
  workdir: Callable[[Any], str] | None = None  # tmp_path -> the --workdir to check
  fixed_validates: bool = False  # the named error has a fix, after which nothing is wrong


def _file(tmp_path) -> str:
  (tmp_path / 'file').write_text('not a directory')
  return str(tmp_path / 'file')


def _under_file(tmp_path) -> str:
  return os.path.join(_file(tmp_path), 'run', 'one')


def _broken_link(tmp_path) -> str:
  os.symlink(tmp_path / 'gone', tmp_path / 'link')
  return str(tmp_path / 'link')


# Beyond tests/test_config.py, tests/attention/test_positions.py and tests/test_cli.py; the
# '_advice' rows repeat a few of their inputs to follow the advice, which they do not.
TABLE = {
    # Sizes that reached model init (a ValueError from RoPE, a ZeroDivisionError) or worse.
    'head_dim_negative': Bad({'model.head_dim': -2}, 'model.head_dim', 'at least 1',
                             fixed_validates=True),
    'head_dim_zero': Bad({'model.head_dim': 0}, 'model.head_dim', 'at least 1',
                         fixed_validates=True),
    'kv_heads_zero': Bad({'model.num_kv_heads': 0}, 'model.num_kv_heads', 'at least 1',
                         fixed_validates=True),
    'kv_heads_negative': Bad({'model.num_kv_heads': -2}, 'model.num_kv_heads', 'at least 1',
                             fixed_validates=True),
    'kv_heads_zero_gqa': Bad({'model.num_kv_heads': 0, 'model.attention': 'gqa'},
                             'model.num_kv_heads', 'e.g. 2', fixed_validates=True),
    'embed_dim_zero': Bad({'model.embed_dim': 0}, 'model.embed_dim', 'at least 1'),
    'num_heads_zero': Bad({'model.num_heads': 0}, 'model.num_heads', 'at least 1'),
    'num_heads_negative': Bad({'model.num_heads': -4}, 'model.num_heads', 'at least 1'),
    'mlp_dim_zero': Bad({'model.mlp_dim': 0}, 'model.mlp_dim', 'at least 1'),
    'vocab_zero': Bad({'model.vocab_size': 0}, 'model.vocab_size', 'must be positive',
                      fixed_validates=True),
    'vocab_below_tokenizer': Bad({'model.vocab_size': 100}, 'model.vocab_size',
                                 "smaller than the tokenizer's 257", fixed_validates=True),
    'max_seq_len_zero': Bad({'model.max_seq_len': 0}, 'model.max_seq_len', 'at least 1',
                            fixed_validates=True),
    'rope_theta_one': Bad({'model.rope_theta': 1.0}, 'model.rope_theta', 'must exceed 1'),
    'norm_eps_zero': Bad({'model.norm_eps': 0.0}, 'model.norm_eps', 'must be positive'),
    'init_std_negative': Bad({'model.init_std': -0.02}, 'model.init_std', 'at least 0'),
    'odd_head_dim_derived': Bad({'model.embed_dim': 60}, 'model.head_dim', 'must be even',
                                fixed_validates=True),
    'gqa_without_a_gqa_count': Bad({'model.attention': 'gqa', 'model.num_heads': 2,
                                    'model.embed_dim': 64}, 'model.num_kv_heads',
                                   "none exists; use 'mha'", fixed_validates=True),
    'gqa_kv_unset': Bad({'model.attention': 'gqa'}, 'model.num_kv_heads', 'e.g. 2',
                        fixed_validates=True),
    'kv_not_dividing_advice': Bad({'model.num_kv_heads': 3}, 'model.num_kv_heads', 'e.g. 2',
                                  fixed_validates=True),
    'mha_named_gqa_advice': Bad({'model.num_kv_heads': 2}, 'model.attention',
                                "set model.attention='gqa'", fixed_validates=True),
    # Encodings.
    'yarn_original_len_zero': Bad({'model.yarn.factor': 4.0, 'model.yarn.original_max_len': 0},
                                  'model.yarn.original_max_len', 'at least 1'),
    'yarn_beta_slow_zero': Bad({'model.yarn.factor': 4.0, 'model.yarn.beta_slow': 0.0},
                               'model.yarn.beta_slow', 'must be positive'),
    'yarn_betas_swapped': Bad({'model.yarn.factor': 4.0, 'model.yarn.beta_fast': 1.0,
                               'model.yarn.beta_slow': 32.0}, 'model.yarn.beta_fast',
                              'beta_fast > beta_slow', fixed_validates=True),
    'yarn_mscale_negative': Bad({'model.yarn.mscale_all_dim': -1.0}, 'model.yarn.mscale_all_dim',
                                'at least 0'),
    'llama3_band_inverted': Bad({'model.llama3_rope.factor': 8.0,
                                 'model.llama3_rope.high_freq_factor': 1.0},
                                'model.llama3_rope.high_freq_factor',
                                'high_freq_factor > low_freq_factor', fixed_validates=True),
    'linear_rope_shrinks': Bad({'model.linear_rope_factor': 0.5}, 'model.linear_rope_factor',
                               'at least 1'),
    'two_rope_scalings': Bad({'model.yarn.factor': 4.0, 'model.llama3_rope.factor': 8.0},
                             'model.llama3_rope.factor', 'and model.yarn.factor=4 both rescale',
                             fixed_validates=True),
    'relative_distance_zero': Bad({'model.position': 'relative',
                                   'model.relative.max_distance': 0},
                                  'model.relative.max_distance', 'at least 1'),
    'relative_distance_short': Bad({'model.position': 'relative',
                                    'model.relative.max_distance': 8},
                                   'model.relative.max_distance', 'T5 uses 128',
                                   fixed_validates=True),
    'learned_table_short': Bad({'model.position': 'learned', 'model.max_seq_len': 32},
                               'model.max_seq_len', 'has 32 rows', fixed_validates=True),
    # MLA.
    'mla_kv_rank_zero': Bad({**MLA, 'model.mla.kv_lora_rank': 0}, 'model.mla.kv_lora_rank',
                            'at least 1'),
    'mla_q_rank_negative': Bad({**MLA, 'model.mla.q_lora_rank': -1}, 'model.mla.q_lora_rank',
                               'at least 0'),
    'mla_v_too_wide': Bad({**MLA, 'model.mla.v_head_dim': 32}, 'model.mla.v_head_dim',
                          'exceeds the q/k head width', fixed_validates=True),
    'mla_with_kv_heads': Bad({**MLA, 'model.num_kv_heads': 2}, 'model.num_kv_heads',
                             'leave model.num_kv_heads unset', fixed_validates=True),
    'mla_with_qkv_bias': Bad({**MLA, 'model.qkv_bias': True}, 'model.qkv_bias',
                             'set model.qkv_bias=False', fixed_validates=True),
    'mla_odd_rope_dim': Bad({**MLA, 'model.mla.qk_rope_head_dim': 7},
                            'model.mla.qk_rope_head_dim', 'must be even', fixed_validates=True),
    # NSA.
    'nsa_block_zero': Bad({**NSA, 'model.nsa.block_len': 0}, 'model.nsa.block_len', 'at least 1'),
    'nsa_stride_not_dividing': Bad({**NSA, 'model.nsa.stride': 3}, 'model.nsa.stride',
                                   'e.g. stride 4', fixed_validates=True),
    'nsa_mean_unequal': Bad({**NSA, 'model.nsa.compression': 'mean'}, 'model.nsa.compression',
                            "use 'mlp'", fixed_validates=True),
    'nsa_with_window': Bad({**NSA, 'model.sliding_window': 16}, 'model.sliding_window',
                           'unset model.sliding_window', fixed_validates=True),
    'nsa_compression_typo': Bad({**NSA, 'model.nsa.compression': 'mlpp'},
                                'model.nsa.compression', "did you mean 'mlp'",
                                fixed_validates=True),
    # MoE.
    'moe_experts_zero': Bad({**MOE, 'model.moe.num_experts': 0}, 'model.moe.num_experts',
                            'at least 1'),
    'moe_expert_dim_zero': Bad({**MOE, 'model.moe.expert_dim': 0}, 'model.moe.expert_dim',
                               'or unset it to use model.mlp_dim', fixed_validates=True),
    'moe_shared_negative': Bad({**MOE, 'model.moe.num_shared_experts': -1},
                               'model.moe.num_shared_experts', 'at least 0'),
    'moe_shared_dim_zero': Bad({**MOE, 'model.moe.num_shared_experts': 1,
                                'model.moe.shared_expert_dim': 0}, 'model.moe.shared_expert_dim',
                               'or unset it to use num_shared_experts', fixed_validates=True),
    'moe_shared_gate_alone': Bad({**MOE, 'model.moe.shared_expert_gate': True},
                                 'model.moe.shared_expert_gate', 'num_shared_experts is 0',
                                 fixed_validates=True),
    'moe_scaling_zero': Bad({**MOE, 'model.moe.routed_scaling_factor': 0.0},
                            'model.moe.routed_scaling_factor', 'must be positive'),
    'moe_aux_negative': Bad({**MOE, 'model.moe.aux_loss_coef': -0.01}, 'model.moe.aux_loss_coef',
                            'at least 0'),
    'moe_bias_rate_negative': Bad({**MOE, 'model.moe.bias_update_rate': -1.0},
                                  'model.moe.bias_update_rate', 'at least 0'),
    'moe_groups_too_few': Bad({**MOE, 'model.moe.num_groups': 4, 'model.moe.topk_groups': 1,
                               'model.moe.top_k': 3}, 'model.moe.topk_groups',
                              'raise topk_groups (to 2)', fixed_validates=True),
    'moe_all_dense': Bad({**MOE, 'model.moe.first_dense_layers': 5},
                         'model.moe.first_dense_layers', "model.ffn='dense'",
                         fixed_validates=True),
    'moe_dispatch_typo': Bad({**MOE, 'model.moe.dispatch': 'dropples'}, 'model.moe.dispatch',
                             "did you mean 'dropless'", fixed_validates=True),
    # Data.
    'seq_len_zero': Bad({'data.seq_len': 0}, 'data.seq_len', 'at least 1'),
    'eval_fraction_zero': Bad({'data.eval_fraction': 0.0}, 'data.eval_fraction',
                              'strictly between 0 and 1'),
    'max_documents_one': Bad({'data.max_documents': 1}, 'data.max_documents',
                             'one to train on, one held out', fixed_validates=True),
    'corpus_unknown': Bad({'data.corpus': 'wikipedia'}, 'data.corpus', 'unknown corpus'),
    'byte_tokenizer_eos': Bad({'data.eos_token': '</s>'}, 'data.eos_token',
                              'leave data.eos_token unset', fixed_validates=True),
    # Training.
    'seed_negative': Bad({'seed': -1}, 'seed', 'must lie in [0, '),
    'seed_too_big': Bad({'seed': 2**64}, 'seed', 'does not fit in a 64-bit integer'),
    'steps_zero': Bad({'train.steps': 0}, 'train.steps', 'at least 1'),
    'batch_zero': Bad({'train.global_batch_size': 0}, 'train.global_batch_size', 'at least 1'),
    'accum_zero': Bad({'train.grad_accum_steps': 0}, 'train.grad_accum_steps', 'at least 1'),
    'accum_not_dividing_advice': Bad({'train.grad_accum_steps': 3}, 'train.grad_accum_steps',
                                     'e.g. 2', fixed_validates=True),
    'learning_rate_nan': Bad({'train.learning_rate': float('nan')}, 'train.learning_rate',
                             'finite'),
    'weight_decay_negative': Bad({'train.weight_decay': -0.1}, 'train.weight_decay',
                                 'at least 0'),
    'b1_one': Bad({'train.b1': 1.0}, 'train.b1', 'must lie in [0, 1)'),
    'b1_negative': Bad({'train.b1': -0.1}, 'train.b1', 'must lie in [0, 1)'),
    'adam_eps_zero': Bad({'train.eps': 0.0}, 'train.eps', 'must be positive'),
    'clip_negative': Bad({'train.grad_clip_norm': -1.0}, 'train.grad_clip_norm', 'at least 0'),
    'eval_every_negative': Bad({'train.eval_every': -1}, 'train.eval_every', 'at least 0'),
    'eval_batches_zero': Bad({'train.eval_batches': 0}, 'train.eval_batches', 'at least 1'),
    'log_every_zero': Bad({'train.log_every': 0}, 'train.log_every', 'at least 1'),
    'checkpoint_every_negative': Bad({'train.checkpoint_every': -1}, 'train.checkpoint_every',
                                     'at least 0'),
    'keep_checkpoints_zero': Bad({'train.keep_checkpoints': 0}, 'train.keep_checkpoints',
                                 'at least 1'),
    'timing_warmup_negative': Bad({'train.timing_warmup_steps': -1},
                                  'train.timing_warmup_steps', 'at least 0'),
    'warmup_all_steps_advice': Bad({'train.warmup_steps': 9}, 'train.warmup_steps',
                                   'no room for decay', fixed_validates=True),
    'profile_everything_advice': Bad({'profile.steps': 5}, 'profile.steps',
                                     'leave no measured steps', fixed_validates=True),
    # The new train.* fields.
    'resume_step_negative': Bad({'train.resume_step': -1}, 'train.resume_step', 'at least 0',
                                fixed_validates=True),
    'resume_step_float': Bad({'train.resume_step': 3.0}, 'train.resume_step', 'expects int'),
    'resume_step_without_checkpoints': Bad({'train.resume_step': 3, 'train.checkpoint_every': 0},
                                           'train.resume_step', 'turns checkpoints off',
                                           fixed_validates=True),
    'on_bad_checkpoint_unknown': Bad({'train.on_bad_checkpoint': 'ignore'},
                                     'train.on_bad_checkpoint', 'valid values: fallback, fail'),
    'on_nonfinite_typo': Bad({'train.on_nonfinite': 'skp'}, 'train.on_nonfinite',
                             "did you mean 'skip'", fixed_validates=True),
    'max_skipped_negative': Bad({'train.max_skipped_steps': -1}, 'train.max_skipped_steps',
                                'at least 0'),
    'max_skipped_unset': Bad({'train.max_skipped_steps': None}, 'train.max_skipped_steps',
                             'must be set', fixed_validates=True),
    # Measurement.
    'sample_interval_negative': Bad({'metrics.sample_interval_s': -0.1},
                                    'metrics.sample_interval_s', 'must be positive'),
    'init_not_a_source': Bad({'model.init': 'nowhere'}, 'model.init',
                             'is not a weight source; use hf:DIR', fixed_validates=True),
    'peak_zero': Bad({'metrics.peak_flops_per_s': 0.0}, 'metrics.peak_flops_per_s',
                     'must be positive', fixed_validates=True),
    'peak_infinite': Bad({'metrics.peak_flops_per_s': math.inf}, 'metrics.peak_flops_per_s',
                         'finite'),
    # The mesh, and the batch over it.
    'mesh_tensor_zero': Bad({'mesh.tensor': 0}, 'mesh.tensor', 'positive device count or -1'),
    'mesh_data_minus_two': Bad({'mesh.data': -2}, 'mesh.data', 'positive device count or -1'),
    'mesh_product_advice': Bad({'mesh.data': 2, 'mesh.fsdp': 1}, 'mesh', 'multiply to 2',
                               {'num_devices': 4}, fixed_validates=True),
    'mesh_two_free_advice': Bad({'mesh.tensor': -1}, 'mesh.tensor', 'only one mesh axis',
                                fixed_validates=True),
    'mqa_over_tensor': Bad({'model.attention': 'mqa', 'mesh.tensor': 2, 'mesh.fsdp': 1},
                           'model.num_kv_heads', 'does not shard over mesh.tensor=2',
                           {'num_devices': 2}, fixed_validates=True),
    'mlp_over_tensor': Bad({'model.mlp_dim': 129, 'mesh.tensor': 2, 'mesh.fsdp': 1},
                           'model.mlp_dim', 'does not shard over mesh.tensor=2',
                           {'num_devices': 2}, fixed_validates=True),
    'experts_over_tensor': Bad({**MOE, 'model.moe.expert_dim': 33, 'mesh.tensor': 2,
                                'mesh.fsdp': 1}, 'model.moe.expert_dim',
                               'does not shard over mesh.tensor=2', {'num_devices': 2},
                               fixed_validates=True),
    'vocab_over_tensor': Bad({'model.vocab_size': 259, 'mesh.tensor': 2, 'mesh.fsdp': 1},
                             'model.vocab_size', 'use a multiple of 2', {'num_devices': 2},
                             fixed_validates=True),
    'experts_over_expert_axis_advice': Bad({**MOE, 'mesh.expert': -1, 'mesh.fsdp': 1},
                                           'mesh.expert', 'use a divisor', {'num_devices': 3},
                                           fixed_validates=False),
    'batch_over_devices_advice': Bad({'train.global_batch_size': 6}, 'train.global_batch_size',
                                     'use a multiple of 4', {'num_devices': 4},
                                     fixed_validates=True),
    'batch_over_processes_advice': Bad({'train.global_batch_size': 2, 'mesh.tensor': 2},
                                       'train.global_batch_size',
                                       'does not split over 4 processes',
                                       {'process_count': 4, 'num_devices': 4},
                                       fixed_validates=True),
    # The workdir, before any model is built.
    'workdir_is_a_file': Bad({}, '--workdir', 'is an existing file', workdir=_file),
    'workdir_under_a_file': Bad({}, '--workdir', 'is a file, not a directory',
                                workdir=_under_file),
    'workdir_broken_link': Bad({}, '--workdir', 'broken symbolic link', workdir=_broken_link),
}


def _check(config, workdir=None, **facts):
  return validate.check_run(config, workdir, **{**FACTS, **facts})


def test_table_is_large():
  assert len(TABLE) >= 40


@pytest.mark.parametrize('name', list(TABLE))
def test_bad_input_names_field_and_advice_validates(name, tmp_path):
  bad = TABLE[name]
  config = _smoke(**bad.overrides)
  workdir = bad.workdir(tmp_path) if bad.workdir else None
  errors = _check(config, workdir, **bad.facts)
  assert errors, 'accepted'
  assert all(isinstance(e, ConfigError) and '\n' not in str(e) for e in errors)
  matching = [e for e in errors if e.field == bad.field]
  assert matching, [str(e) for e in errors]
  assert any(bad.phrase in e.message for e in matching), [e.message for e in matching]
  for e in errors:  # every fix, followed, clears its field
    if e.fix is not None:
      after = _check(_apply(config, e.fix), workdir, **bad.facts)
      assert e.field not in [a.field for a in after], (e.fix, [str(a) for a in after])
  if bad.fixed_validates:
    (error,) = [e for e in matching if bad.phrase in e.message]
    assert error.fix, f'{error} advises a change but carries no fix'
    assert _check(_apply(config, error.fix), **bad.facts) == []


def test_unwritable_workdir_as_the_check_sees_it(tmp_path, monkeypatch):
  """A workdir this user may not write, as os.access answers (faked: tests and CI run as root,
  who may write anywhere)."""
  monkeypatch.setattr(validate.os, 'access', lambda path, mode: False)
  (error,) = validate.check_workdir(str(tmp_path))
  assert error.field == '--workdir' and 'is not writable' in error.message
  (error,) = validate.check_workdir(str(tmp_path / 'new' / 'run'))
  assert f'no permission to write in {tmp_path}' in error.message


def test_good_workdirs(tmp_path):
  assert validate.check_workdir(str(tmp_path)) == []
  assert validate.check_workdir(str(tmp_path / 'new' / 'deeper')) == []
  assert validate.check_workdir('runs/quickstart-now') == []


def test_a_missing_field_is_named_with_its_default():
  config = _smoke()
  del config['train']['on_nonfinite']
  errors = _check(config)
  assert [(e.field, e.fix) for e in errors] == [('train.on_nonfinite',
                                                 {'train.on_nonfinite': 'stop'})]
  assert _check(_apply(config, errors[0].fix)) == []


def test_every_field_has_a_rule():
  assert set(validate.RULES) == set(validate.schema_paths())
  # A placeholder (None: "derive it") needs a rule that takes None.
  schema = base.get_config()
  for path, rule in validate.RULES.items():
    node = schema
    for key in path.split('.'):
      node = node[key]
    if node is None:
      assert isinstance(rule, (validate.Optional, validate.Free)), path


def test_shipped_presets_are_declared_and_valid():
  """Each config file's PRESETS (what --help lists) names every preset it handles."""
  for path, description, presets in main.config_files():
    assert description and presets, path
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
      source = f.read()
    assert set(re.findall(r"preset == '(\w+)'", source)) <= set(presets), path
    module = __import__(f'configs.{os.path.basename(path)[:-3]}', fromlist=['get_config'])
    for preset in presets:
      config = module.get_config(preset)
      assert validate.check(config, num_devices=1, process_count=1, backend='gpu') == [], path


def _cli(*args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_exits_2_with_one_line_per_problem(tmp_path):
  """The mistakes that ended in tracebacks, through the real command, in one round."""
  proc = _cli('--config=configs/quickstart.py:smoke', '--config.model.head_dim=-2',
              '--config.model.num_kv_heads=0', '--config.train.on_nonfinite=skp',
              '--config.data.eval_fraction=0.0', f'--workdir={_under_file(tmp_path)}')
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert all(line.startswith('config error: ') for line in lines), lines
  fields = {line.split(': ')[1] for line in lines}
  assert fields == {'model.head_dim', 'model.num_kv_heads', 'train.on_nonfinite',
                    'data.eval_fraction', '--workdir'}, lines
  proc = _cli('--config=configs/quickstart.py:smoke', '--config.model.head_dim=0',
              f'--workdir={tmp_path / "file"}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'config error: model.head_dim: must be at least 1' in proc.stderr
  assert 'config error: --workdir: ' in proc.stderr and 'is an existing file' in proc.stderr


@pytest.mark.parametrize('flag', ['--help', '-h', '--helpfull'])
def test_help_lists_the_configs_without_importing_jax(flag):
  code = ('import sys; sys.argv = ["main", %r]\n'
          'from experiments import main\n'
          'try:\n  main.run()\n'
          'except SystemExit as e:\n'
          '  print("jax imported" if "jax" in sys.modules else "jax not imported")\n'
          '  sys.exit(e.code)\n') % flag
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith('usage: python -m experiments.main --config=')
  assert 'jax not imported' in out
  line = next(l for l in out.splitlines() if l.strip().startswith('configs/quickstart.py'))
  assert line.strip() == 'configs/quickstart.py[:smoke]'
  with open(os.path.join(ROOT, 'configs', 'quickstart.py'), encoding='utf-8') as f:
    description = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
  assert description in out
  assert 'configs/moe_16b.py[:smoke|:1gpu]' in out
  assert 'base.py' not in out.split('flags:')[0] and '__init__' not in out
  assert '--workdir=DIR' in out and '--config.FIELD=VALUE' in out


def test_help_exits_0_from_the_real_command():
  proc = _cli('--help')
  assert proc.returncode == 0 and 'configs/quickstart.py[:smoke]' in proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------
# The sweep: 0, -1, small and huge values of every numeric field, on each variant.

# One unscanned layer: tracing a scan would make each build several times slower.
TINY = {'model.embed_dim': 32, 'model.num_heads': 4, 'model.mlp_dim': 32, 'model.num_layers': 1,
        'model.scan_layers': False, 'data.seq_len': 16}
BASES = {
    'dense': {},
    'gqa_relative': {'model.attention': 'gqa', 'model.num_kv_heads': 2,
                     'model.position': 'relative', 'model.relative.num_buckets': 8,
                     'model.relative.max_distance': 16},
    'mqa_learned': {'model.attention': 'mqa', 'model.position': 'learned'},
    'yarn': {'model.yarn.factor': 4.0, 'model.yarn.original_max_len': 8,
             'model.yarn.mscale': 1.0, 'model.yarn.mscale_all_dim': 1.0},
    'llama3': {'model.llama3_rope.factor': 8.0, 'model.llama3_rope.original_max_len': 8},
    'mla': {**MLA, 'model.mla.kv_lora_rank': 8, 'model.mla.qk_nope_head_dim': 4,
            'model.mla.qk_rope_head_dim': 4, 'model.mla.v_head_dim': 4},
    'nsa': {**NSA, 'model.nsa.block_len': 4, 'model.nsa.stride': 2,
            'model.nsa.select_block_len': 4, 'model.nsa.window': 8},
    'moe': {**MOE, 'model.num_layers': 2, 'model.moe.num_experts': 4, 'model.moe.expert_dim': 8,
            'model.moe.num_shared_experts': 1, 'model.moe.first_dense_layers': 1},
}
# Sections a base exercises: the others' fields change nothing it builds.
SECTIONS = {'gqa_relative': ('model.relative.',), 'yarn': ('model.yarn.',),
            'llama3': ('model.llama3_rope.',),
            'mla': ('model.mla.',), 'nsa': ('model.nsa.',), 'moe': ('model.moe.',)}
_SUB = tuple(s for sections in SECTIONS.values() for s in sections)
HUGE = {int: (2**62, 10**30), float: (1e300, math.inf, math.nan)}
BUILT = (0, -1, 1, 3)  # what validates at these values must build


def _swept_fields(base_name):
  fields = [p for p, t in validate.schema_paths().items() if t in (int, float)]
  if base_name == 'dense':
    return [p for p in fields if not p.startswith(_SUB)]
  own = SECTIONS.get(base_name, ())
  return [p for p in fields if p.startswith('model.') and (not p.startswith(_SUB) or
                                                           p.startswith(own))]


def _build(config):
  cfg = ModelConfig.from_config(config['model'], tokenizer_vocab_size=BYTE_VOCAB,
                                seq_len=config['data']['seq_len'])
  tokens = jax.ShapeDtypeStruct((1, min(config['data']['seq_len'], 16)), jnp.int32)
  jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


def test_no_value_makes_validation_raise_and_what_validates_builds():
  built = set()
  for name, overrides in BASES.items():
    base_config = _smoke(**{**TINY, **overrides})
    assert _check(base_config) == [], name
    for field in _swept_fields(name):
      kind = validate.schema_paths()[field]
      for value in BUILT + HUGE[kind]:
        value = float(value) if kind is float else value
        config = _apply(base_config, {field: value})
        errors = _check(config)  # raises nothing but ConfigErrors ...
        assert all(isinstance(e, ConfigError) for e in errors), (name, field, value)
        for e in errors:  # ... and each fix clears its field
          if e.fix is not None:
            after = _check(_apply(config, e.fix))
            assert e.field not in [a.field for a in after], (name, field, value, e.fix, after)
        key = repr((config['model'], config['data']['seq_len']))
        if not errors and value in BUILT and key not in built:
          built.add(key)
          try:
            _build(config)
          except Exception as e:  # pylint: disable=broad-except
            pytest.fail(f'{name}: {field}={value!r} validates but does not build: {e!r}')
  assert len(built) > 50  # the sweep reached the model
