"""experiments/bench_moe_gmm.py's --quick mode, end to end in a fresh process: the script a
scarce GPU call runs must not be the first to find its own bugs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_benchmark_checks_every_variant_and_writes_json(tmp_path):
  out = tmp_path / 'gmm.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.bench_moe_gmm', '--quick', '--repeats=1',
       f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['command'].endswith(f'--quick --repeats=1 --out={out}')
  assert [(r['shape'], r['groups']) for r in results['runs']] == [('quick', 'even'),
                                                                  ('quick', 'skewed')]
  for run in results['runs']:
    variants = run['variants']
    # On CPU: the baselines and the interpreted Triton kernel at its default tiling.
    assert {'ragged_dot', 'dense_same_flops', 'batched_einsum_capacity',
            'ours_triton_0'} <= set(variants)
    for name, entry in variants.items():
      assert 'error' not in entry, (name, entry)
      assert entry['fwd_ms'] > 0 and entry['fwd_bwd_ms'] > 0
      if name in ('ragged_dot', 'ours_triton_0'):
        assert entry['correct'] and entry['grad_rel_err'] <= 2e-2
