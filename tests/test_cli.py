"""The command a user types, end to end, in a fresh process."""

import json
import math
import os
import subprocess
import sys

import pytest

from efficientjax.metrics.record import read_records, validate_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a laptop
  # With the suite's own compile-time flags (tests/conftest.py: LLVM's optimisation level 0, the
  # CPU's older fusion emitters): these runs are compile-bound, and what they check does not
  # depend on how fast XLA's code is.
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_a_complete_record(tmp_path):
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/quickstart.py:smoke', f'--workdir={workdir}',
               '--config.train.steps=7', '--config.profile.steps=2')
  assert proc.returncode == 0, proc.stderr
  assert f'result record: {workdir}/results.jsonl' in proc.stdout
  (record,) = read_records(workdir / 'results.jsonl')
  validate_record(record)
  for key in ('schema_version', 'run_id', 'kind', 'created_at', 'config', 'config_hash', 'env',
              'model', 'quality', 'metrics'):
    assert key in record, key
  assert record['kind'] == 'pretrain'
  assert record['config']['train']['steps'] == 7  # the override reached the run
  env = record['env']
  for key in ('jax', 'jaxlib', 'flax', 'backend', 'device_kind', 'device_count', 'process_count',
              'mesh_shape', 'git_commit'):
    assert key in env, key
  assert env['backend'] == 'cpu' and env['device_count'] == 1
  assert env['mesh_shape'] == {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  assert record['model']['params'] > 0 and record['model']['weight_bytes'] == 4 * record['model']['params']
  q = record['quality']
  assert q['initial_eval_perplexity'] > q['eval_perplexity'] > 1
  m = record['metrics']
  step_ms = m['latency']['step_ms']
  assert step_ms['count'] == 7 - 2 - 2  # warm-up and profiled steps are left out
  assert m['latency']['window_steps'] == 3 and m['latency']['window_s'] > 0
  assert 0 < step_ms['p50'] <= step_ms['p90'] <= step_ms['p99']
  # The window holds the measured steps and the few host lines between them, never the
  # compilation: its length minus the steps' own time is far below the compile time (a window
  # opened before compiling, or the compile time added to it, breaks this by compile_s).
  steps_s = step_ms['mean'] * step_ms['count'] / 1e3
  assert steps_s <= m['latency']['window_s'] < steps_s + 0.25 * m['latency']['compile_s']
  assert m['throughput']['tokens_per_s'] == pytest.approx(
      record['steps']['tokens_per_step'] * 3 / m['latency']['window_s'])
  # Quality as the README defines it, from the run's own per-step log.
  with open(workdir / 'train_log.jsonl') as f:
    log = [json.loads(line) for line in f]
  assert [line['step'] for line in log] == list(range(1, 8))
  assert q['train_loss'] == pytest.approx(sum(line['loss'] for line in log) / 7)  # <= 10 steps
  assert q['eval_perplexity'] == pytest.approx(math.exp(q['eval_loss']))
  assert q['initial_eval_perplexity'] == pytest.approx(math.exp(q['initial_eval_loss']))
  # The quickstart's record on CPU: MFU needs a peak, which a CPU does not have in the table.
  assert m['compute']['mfu_analytic'] is None and 'peak_flops_per_s' in m['compute']['reason']
  assert m['compute']['achieved_flops_per_s_analytic'] > 0
  assert m['compute']['compiler_flops_per_step'] > m['compute']['analytic_flops_per_step']['total']
  assert m['energy']['energy_j'] is not None or m['energy']['reason']
  assert m['memory']['host_rss_bytes_peak'] > 0
  t = m['trace']
  assert t['available'] and t['source'] == 'host' and t['steps'] == 2
  assert abs(sum(t['categories_ms'].values()) - t['busy_ms']) <= 0.02 * t['busy_ms']
  assert os.path.exists(t['trace_path'])
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6', '7']


def test_peak_from_the_config_gives_an_mfu_and_the_default_workdir(tmp_path):
  # One run for both: the workdir named after the config and the time, and a configured peak.
  proc = _main(f'--config={ROOT}/configs/quickstart.py:smoke', '--config.train.steps=4',
               '--config.metrics.peak_flops_per_s=1e12', '--config.train.checkpoint_every=0',
               cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  (run,) = os.listdir(tmp_path / 'runs')
  assert run.startswith('quickstart_smoke-')
  (record,) = read_records(tmp_path / 'runs' / run / 'results.jsonl')
  validate_record(record)
  c = record['metrics']['compute']
  assert c['peak_source'] == 'config: metrics.peak_flops_per_s'
  assert c['mfu_analytic'] == pytest.approx(c['achieved_flops_per_s_analytic'] / 1e12)


@pytest.mark.parametrize('args, message', [
    (['--config.model.num_layers=abc'], 'config error: model.num_layers: invalid literal'),
    (['--config.model.num_layerz=3'], "model.num_layerz: unknown field; did you mean "
                                      "'model.num_layers'?"),
    (['--config.model.attention=flash'], 'model.attention: unknown value'),
    (['--config.model.num_kv_heads=3'], 'model.num_kv_heads: 3 does not divide'),
    (['--config=configs/quickstart.py:huge'], "unknown preset 'huge'"),
    (['--config=configs/missing.py'], 'config error: --config'),
    (['--config.data.corpus=text:/nonexistent/*.txt'], 'data.corpus'),
    (['--config.data.tokenizer=/nonexistent/tokenizer.json'], 'data.tokenizer'),
])
def test_bad_config_exits_2_with_one_message(args, message, tmp_path):
  proc = _main('--config=configs/quickstart.py:smoke', *args, f'--workdir={tmp_path}/w')
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_workdir_of_another_model_is_not_overwritten(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--config=configs/quickstart.py:smoke', f'--workdir={workdir}', '--config.train.steps=3']
  assert _main(*args).returncode == 0
  before = sorted(os.listdir(workdir / 'checkpoints'))
  proc = _main(*args, '--config.model.num_layers=3')
  assert proc.returncode == 2 and 'model differ' in proc.stderr, proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  # Longer training of the same model resumes instead.
  proc = _main(*args[:-1], '--config.train.steps=4')
  assert proc.returncode == 0, proc.stderr
  assert 'resumed from the checkpoint at step 3' in proc.stderr
  records = read_records(workdir / 'results.jsonl')
  assert [r['steps']['final'] for r in records] == [3, 4]
  with open(workdir / 'config.json') as f:
    assert json.load(f)['train']['steps'] == 4
