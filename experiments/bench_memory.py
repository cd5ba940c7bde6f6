"""The memory estimate against the compiler's plan and the measured peak, config by config.

For each case (a small model on one device, a study point's shape), builds the training step
as a run does (efficientjax/train/fit.py), reads the analytic estimate and the compiled step's
memory analysis, then allocates the state (zeros), runs one step and measures the peak
(efficientjax.metrics.memory.StepPeak: the allocator's peak on a GPU, the resident
high-water mark's rise on a CPU). Writes one row per case.

  python -m experiments.bench_memory [--cases=mha_none,...] [--out=FILE.json]

On Linux CPUs it re-executes itself with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_),
so that freed buffers leave the resident set and the high-water mark measures the step alone;
on a GPU each case runs in its own process (the allocator's peak cannot be reset).
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from efficientjax.metrics.record import environment
from experiments.memory_cases import CASES, SMALL, config_of, measure

_MMAP_ENV = 'MALLOC_MMAP_THRESHOLD_'
_CASES = flags.DEFINE_list('cases', list(CASES), 'which cases to run')
_OUT = flags.DEFINE_string('out', None, 'write the results here as JSON')


def main(argv):
  del argv
  if sys.platform == 'linux' and _MMAP_ENV not in os.environ:
    os.execve(sys.executable, [sys.executable, '-m', 'experiments.bench_memory'] + sys.argv[1:],
              {**os.environ, _MMAP_ENV: str(1 << 17)})
  cases, out_path = _CASES.value, _OUT.value
  child_env = dict(os.environ)
  # A GPU's allocator takes 75% of the card when the backend starts, and its peak counts from
  # process start and cannot be reset, so there each case runs in a process of its own; this
  # one, which only asks which backend it has, must not take the children's memory.
  if len(cases) > 1:
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  one_process = len(cases) == 1 or jax.default_backend() == 'cpu'
  if one_process:
    # The runtime's one-time start-up (thread pools, the first dot) before any case's window.
    jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((256, 256))))
  rows = {}
  for name in cases:
    if not one_process:
      with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'case.json')
        subprocess.run([sys.executable, '-m', 'experiments.bench_memory', f'--cases={name}',
                        f'--out={out}'], check=True, env=child_env)
        with open(out) as f:
          row = json.load(f)['rows'][name]
    else:
      row = measure(config_of(CASES[name]))
    rows[name] = row
    mib = lambda n: f'{n / 2**20:8.1f}' if n is not None else '       ?'
    print(f'{name:20s} estimate {mib(row["estimate"]["device_bytes"])} MiB  compiler '
          f'{mib(row["compiler_bytes"])}  measured {mib(row["measured_peak_bytes"])}  '
          f'est/compiler {row["estimate_over_compiler"] or 0:.2f}  est/measured '
          f'{row["estimate_over_measured"] or 0:.2f}', flush=True)
    if out_path:
      with open(out_path, 'w') as f:
        json.dump({'env': environment(), 'cases': CASES, 'small': SMALL, 'rows': rows}, f,
                  indent=1, default=str)


if __name__ == '__main__':
  app.run(main)
