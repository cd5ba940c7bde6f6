"""The 7B point on one GPU with its optimizer state in host memory, and what the offload costs.

Runs the real command (experiments/main.py) for a few steps of random tokens and reads each
run's record:
  1. configs/mla_7b.py:1gpu: AdamW's moments in pinned host memory (55 GB), fp32 params and
     gradients on the GPU: step time, MFU, the memory plan (estimate, compiler, measured peak)
     and the profiled steps' kernel breakdown;
  2. the same body cut to `--layers` layers, with and without the offload (both fit): the
     difference in step time is the offload's cost, its share of the offloaded step.

  python -m experiments.bench_offload [--config=configs/mla_7b.py:1gpu] [--steps=10] [--layers=8]
                                      [--out=FILE.json]

XLA_PYTHON_CLIENT_MEM_FRACTION is set to 0.95 for the runs (JAX takes 75% of a GPU by
default, less than the preset needs).
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from efficientjax.metrics.record import environment, read_records

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = flags.DEFINE_string('config', 'configs/mla_7b.py:1gpu', 'the config (and preset) to run')
_STEPS = flags.DEFINE_integer('steps', 10, 'steps per run (2 warm-up and 2 profiled among them)')
_LAYERS = flags.DEFINE_integer('layers', 8, 'layers of the cut twin run with and without offload')
_OUT = flags.DEFINE_string('out', None, 'write the results here as JSON')


def _run(name: str, overrides: list[str], workdir: str) -> dict:
  argv = [sys.executable, '-m', 'experiments.main', f'--config={_CONFIG.value}',
          f'--workdir={workdir}', f'--config.train.steps={_STEPS.value}',
          '--config.train.checkpoint_every=0', '--config.train.eval_every=0',
          '--config.train.eval_batches=1', '--config.data.corpus=synthetic',
          '--config.profile.steps=2', *overrides]
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION='0.95')
  proc = subprocess.run(argv, cwd=_ROOT, env=env, capture_output=True, text=True)
  row = {'name': name, 'command': ' '.join(argv[1:]), 'returncode': proc.returncode}
  if proc.returncode != 0:
    row['stderr_tail'] = proc.stderr[-4000:]
    return row
  (record,) = read_records(os.path.join(workdir, 'results.jsonl'))
  m = record['metrics']
  trace = m['trace']
  row.update({
      'params': record['model']['params'],
      'step_ms': m['latency']['step_ms'],
      'tokens_per_s': m['throughput']['tokens_per_s'],
      'mfu_analytic': m['compute']['mfu_analytic'],
      'mfu_compiler': m['compute']['mfu_compiler'],
      'bytes_in_use_peak': m['memory']['bytes_in_use_peak'],
      'bytes_limit': m['memory']['bytes_limit'],
      'plan': m['memory']['plan'],
      'trace_categories_share': trace.get('categories_share'),
      'trace_top_kernels': trace.get('top_kernels'),
      'energy_j_per_token': m['energy'].get('joules_per_token'),
  })
  return row


def main(argv):
  del argv
  rows = []

  def save():
    if _OUT.value:
      with open(_OUT.value, 'w') as f:
        json.dump({'env': environment(), 'rows': rows, 'offload_share': share(rows)}, f,
                  indent=1, default=str)

  with tempfile.TemporaryDirectory() as tmp:
    cut = f'--config.model.num_layers={_LAYERS.value}'
    runs = [('offload', ['--config.train.offload_optimizer=True']),
            (f'{_LAYERS.value}_layers_offload', [cut, '--config.train.offload_optimizer=True']),
            (f'{_LAYERS.value}_layers_on_device', [cut, '--config.train.offload_optimizer=False'])]
    for name, overrides in runs:
      rows.append(_run(name, overrides, os.path.join(tmp, name)))
      print(json.dumps({k: v for k, v in rows[-1].items() if k not in ('plan', 'trace_top_kernels')},
                       default=str), flush=True)
      save()


def share(rows: list[dict]) -> float | None:
  """(offloaded - on-device) / offloaded median step time of the cut twin."""
  by = {r['name']: r for r in rows if r.get('returncode') == 0}
  off = next((r for n, r in by.items() if n.endswith('_layers_offload')), None)
  on = next((r for n, r in by.items() if n.endswith('_layers_on_device')), None)
  if not off or not on:
    return None
  t_off, t_on = off['step_ms']['p50'], on['step_ms']['p50']
  return (t_off - t_on) / t_off


if __name__ == '__main__':
  app.run(main)
