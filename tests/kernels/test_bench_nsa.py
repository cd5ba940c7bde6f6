"""experiments/bench_nsa.py's --quick mode, end to end in a fresh process (the NSA kernels in
Pallas' interpreter): the script a scarce GPU call runs must not be the first to find its own
bugs. Also the GPU-check summary of what it writes."""

import json
import os
import subprocess
import sys

from experiments import gpu_checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OURS = ('ours', 'ours_cmp_fwd', 'ours_select', 'ours_slc_fwd', 'ours_win_fwd', 'ours_cmp_bwd',
        'ours_slc_bwd', 'ours_win_bwd', 'decode_ours', 'decode_ours_kernels')


def test_quick_benchmark_checks_every_variant_and_writes_json(tmp_path):
  out = tmp_path / 'nsa.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.bench_nsa', '--quick', '--repeats=1', f'--out={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['command'].endswith(f'--quick --repeats=1 --out={out}')
  assert results['interpret'] and results['env']['backend'] == 'cpu'
  [run] = results['runs']
  assert run['shape'] == 'quick_128' and 'error' not in run, run.get('error')

  # Correctness first: all 128 queries' three outputs, the selection and all seven gradients.
  checks = run['checks']
  forward = checks['forward']
  assert forward['queries'] == 128
  assert forward['passed'] == {'cmp': True, 'slc': True, 'win': True, 'select': True,
                               'timed_same_as_checked': True}
  assert max(forward['max_rel_err'].values()) <= results['tolerance']
  assert forward['selection']['duplicates'] == 0 and forward['selection']['future_blocks'] == 0
  assert forward['selection']['max_importance_gap'] <= results['importance_tolerance']
  backward = checks['backward']
  assert backward['tokens'] == 128 and len(backward['max_rel_err']) == 7
  assert all(backward['passed'].values()), backward
  assert all(checks['dq_full_length']['passed'].values())

  # On CPU: XLA's dense attention (no cuDNN), every kernel row, the reference, decode.
  variants = run['variants']
  assert set(variants) == {'dense_xla', 'reference', 'decode_dense_xla', *OURS}
  for name, entry in variants.items():
    assert 'error' not in entry and 'skipped' not in entry, (name, entry)
    timings = [k for k in ('fwd_ms', 'bwd_ms', 'fwd_bwd_ms') if k in entry]
    assert timings and all(entry[k] > 0 for k in timings), (name, entry)
  for name in ('dense_xla', 'ours', 'reference'):
    entry = variants[name]
    assert entry['fwd_ms_min'] <= entry['fwd_ms'] <= entry['fwd_ms_max']
    assert abs(entry['bwd_ms'] - (entry['fwd_bwd_ms'] - entry['fwd_ms'])) < 1e-9
  assert variants['ours']['dense_baseline'] == 'dense_xla'
  assert variants['ours']['fwd_speedup_vs_dense'] > 0
  assert all(variants['decode_ours']['check']['passed'].values())
  assert variants['decode_ours']['dense_baseline'] == 'decode_dense_xla'
  # Each kernel alone reproduces its call inside the checked run (outputs and gradients).
  assert checks['forward']['kernel_calls'] == [n[len('ours_'):] for n in OURS[1:8]]
  for name in OURS[1:8]:
    assert max(variants[name]['rel_err_vs_checked_run']) <= results['tolerance'], name
  assert variants['decode_ours_kernels']['kernel_calls'] == ['cmp_fwd', 'select', 'slc_fwd',
                                                             'win_fwd']
  assert run['goals'] == {}  # 128 tokens measure none of the goals

  summary = gpu_checks.summarize_bench_nsa(results)
  assert summary.startswith('quick_128: fwd '), summary
  assert '0 wrong, 0 failed' in summary


def test_summary_names_goals_and_failures():
  result = {'runs': [
      {'shape': '1.5b_16k', 'variants': {
          'dense_cudnn': {'fwd_ms': 2.0},
          'ours': {'fwd_speedup_vs_dense': 3.0, 'bwd_speedup_vs_dense': 1.5},
          'ours_select': {'error': 'wrong: check failed'},
          'reference': {'skipped': 'too long'}},
       'goals': {'fwd_2.5x_at_16k': {'met': True}, 'bwd_1.7x_at_16k': {'met': False}}},
      {'shape': 'paper_64k', 'error': 'RESOURCE_EXHAUSTED: out of memory', 'variants': {}},
  ]}
  assert gpu_checks.summarize_bench_nsa(result) == (
      '1.5b_16k: fwd 3.00x bwd 1.50x (goals met 1/2); '
      'paper_64k: RESOURCE_EXHAUSTED: out of memory; 1 wrong, 0 failed, 1 skipped')
