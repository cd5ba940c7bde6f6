"""experiments/gpu_checks.py: every entry imports and takes the flags the runner gives it, and
the budget runs what fits, cuts what overruns (keeping its JSON) and skips what cannot fit."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import gpu_checks
from experiments.gpu_checks import Check


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a fresh process per module: absl flags are global, and the runner defines its own --out.
PROBE = """
import importlib, sys
from absl import flags
importlib.import_module(sys.argv[1])
missing = [a for a in sys.argv[2:] if a not in flags.FLAGS]
sys.exit(f'defines no flag {missing}' if missing else 0)
"""


@pytest.mark.parametrize('module', sorted({c.module for c in gpu_checks.CHECKS}))
def test_every_check_imports_and_knows_its_flags(module):
  """A typo in a check's flags, or a module that no longer imports, would cost a GPU call."""
  names = {arg[2:].split('=')[0] for c in gpu_checks.CHECKS if c.module == module
           for arg in (*c.args, '--out=x')}
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT
  proc = subprocess.run([sys.executable, '-c', PROBE, module, *sorted(names)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_check_says_why_and_how_long():
  for check in gpu_checks.CHECKS:
    assert check.why and check.estimate_s > 0, check.name


def test_names_are_unique():
  names = [c.name for c in gpu_checks.CHECKS]
  assert len(names) == len(set(names))


FAKE = textwrap.dedent('''
    """A stand-in check: writes its JSON, then sleeps (--sleep) or fails (--fail)."""
    import json, sys, time
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    with open(args['out'], 'w') as fh:
      json.dump({'runs': [], 'started': True}, fh)
    print('fake check running', flush=True)
    if 'fail' in args:
      sys.exit(3)
    time.sleep(float(args.get('sleep', 0)))
    with open(args['out'], 'w') as fh:
      json.dump({'runs': [], 'finished': True}, fh)
    ''')


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
  (tmp_path / 'pkg').mkdir()
  (tmp_path / 'pkg' / 'fake_gpu_check.py').write_text(FAKE)
  monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'pkg'))
  results = tmp_path / 'results'
  (results / 'h100').mkdir(parents=True)
  (results / 'cpu').mkdir()
  monkeypatch.setattr(gpu_checks, 'RESULTS', str(results))
  return results


def _check(name, estimate_s, *args):
  return Check(name, 'a test', 'fake_gpu_check', tuple(args), estimate_s,
               summarize=lambda r: 'finished' if r.get('finished') else 'started only')


def test_budget_runs_what_fits_cuts_overruns_and_skips_the_rest(tmp_path, fake_module):
  # A result committed for the GPU marks its check done; one in results/cpu does not.
  (fake_module / 'h100' / 'done_already.json').write_text('{}')
  (fake_module / 'cpu' / 'cpu_only_result.json').write_text('{}')
  checks = [_check('done_already', 1), _check('fails', 1, '--fail=1'),
            _check('cpu_only_result', 1), _check('overruns', 1, '--sleep=60'),
            _check('too_big', 1000)]
  out = tmp_path / 'out'
  rows = gpu_checks.run_checks(checks, str(out), budget_s=4)
  by_name = {r['name']: r for r in rows}
  assert [r['name'] for r in rows] == [c.name for c in checks]
  assert by_name['done_already']['status'] == 'done'
  assert by_name['done_already']['result'].endswith('h100/done_already.json')
  assert by_name['fails']['status'] == 'failed' and by_name['fails']['exit_code'] == 3
  assert by_name['cpu_only_result']['status'] == 'passed'
  assert by_name['cpu_only_result']['found'] == 'finished'
  # Cut by the budget, not by its own end: the JSON it wrote before the cut comes back.
  cut = by_name['overruns']
  assert cut['status'] == 'cut' and cut['seconds'] < 15 and cut['found'] == 'started only'
  assert by_name['too_big']['status'] == 'skipped'
  assert 'estimate 1000 s' in by_name['too_big']['reason']
  assert not (out / 'too_big.json').exists()
  summary = json.loads((out / gpu_checks.SUMMARY).read_text())
  assert [r['status'] for r in summary['checks']] == ['done', 'failed', 'passed', 'cut',
                                                      'skipped']
  log = (out / gpu_checks.LOG).read_text()
  assert log.count('fake check running') == 3 and 'overruns: cut' in log
  assert 'too_big' in gpu_checks.table(rows)


def test_rerun_done_and_a_spent_budget(tmp_path, fake_module):
  (fake_module / 'h100' / 'done_already.json').write_text('{}')
  rows = gpu_checks.run_checks([_check('done_already', 1)], str(tmp_path / 'a'), budget_s=30,
                               rerun_done=True)
  assert rows[0]['status'] == 'passed'
  rows = gpu_checks.run_checks([_check('next', 1)], str(tmp_path / 'b'), budget_s=0.5)
  assert rows[0]['status'] == 'skipped'


def test_summary_of_a_grouped_matmul_benchmark():
  result = {'runs': [{'shape': 's', 'groups': 'even', 'variants': {
      'dense_same_flops': {'fwd_tflops': 300.0, 'fwd_bwd_tflops': 400.0},
      'ours_mosaic_gpu_0': {'fwd_tflops': 100.0, 'fwd_bwd_tflops': 90.0},
      'ours_mosaic_gpu_3': {'fwd_tflops': 200.0, 'fwd_bwd_tflops': 150.0},
      'ours_mosaic_gpu_4': {'error': 'wrong gradients: not timed'},
      'ours_triton_0': {'error': 'ValueError: no'}}}]}
  assert gpu_checks.summarize_bench_moe_gmm(result) == (
      '3 right, 1 wrong, 1 failed; best fwd/fwd+bwd TFLOP/s: s/even/dense_same_flops 300/400; '
      's/even/ours_mosaic_gpu 200/150')


CONFIGS_VALIDATE = """
import sys
from absl import flags
from experiments import bench_finetune, validate
flags.FLAGS(['bench_finetune', *sys.argv[1:]])
for method in bench_finetune._METHODS.value:
  errors = validate.check(bench_finetune._config(method))
  if errors:
    sys.exit(f'{method}: {errors}')
"""


def test_finetune_check_rows_pass_validation():
  """Every row of the fine-tuning check must get past the config's validation: on the GPU the
  first time, all seven rows failed in 36 s on a warm-up longer than the 12-step run."""
  check = next(c for c in gpu_checks.CHECKS if c.name == 'finetune_methods_1b')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT
  proc = subprocess.run([sys.executable, '-c', CONFIGS_VALIDATE, *check.args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
