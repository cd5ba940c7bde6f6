"""Peak host memory of exporting a model as a Hugging Face checkpoint, against its weight bytes.

    python -m experiments.bench_export [--params_m=100,400] [--out=experiments/results/cpu/bench_export.json]

For each size, in a fresh process: a Llama-shaped model's float32 params are made on the host,
then `save_llama` writes them (fp32 and bf16 in one file, bf16 in four shards). The peak resident memory of the export alone is read from the kernel's high-water
mark (VmHWM, reset through /proc/self/clear_refs just before the export), and reported over the
weight bytes: the params themselves count 1.0, so 1.0 + the export's own working set.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_list('params_m', ['100', '400'], 'model sizes, millions of parameters')
flags.DEFINE_string('out', None, 'JSON results file (default: print only)')
FLAGS = flags.FLAGS

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(f'no {field} in /proc/self/status')


def _reset_peak() -> None:
  """Resets VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def measure(params_m: float, dtype: str, max_shard_bytes: int, directory: str) -> dict:
  """One export in this process; call in a fresh process per measurement."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from efficientjax.hf import save_llama  # pylint: disable=g-import-not-at-top
  from efficientjax.model import ModelConfig  # pylint: disable=g-import-not-at-top
  # Width 1024, 16 heads, SwiGLU 2816, a 16k vocabulary; layers to reach the size. The
  # largest tensors (the embedding and the head, 67 MB each in float32) are then a few percent
  # of the weights, as in real models.
  vocab = 16384
  per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
  layers = max(1, round((params_m * 1e6 - 2 * vocab * 1024) / per_layer))
  cfg = ModelConfig(vocab_size=vocab, embed_dim=1024, num_layers=layers, num_heads=16,
                    num_kv_heads=16, head_dim=64, mlp_dim=2816)
  import jax  # pylint: disable=g-import-not-at-top
  from efficientjax.model import Transformer  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))
  baseline_kib = _rss_kib('VmRSS')
  # np.full makes each array in place: no float64 temporary inflates the peak.
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32),
                        jax.tree.map(lambda b: getattr(b, 'value', b), shapes['params'],
                                     is_leaf=lambda x: hasattr(x, 'value')))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  with_params_kib = _rss_kib('VmRSS')
  _reset_peak()
  t = time.perf_counter()
  save_llama(directory, params, cfg, dtype=dtype, max_shard_bytes=max_shard_bytes)
  seconds = time.perf_counter() - t
  peak_kib = _rss_kib('VmHWM')
  files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
  return {
      'params': int(sum(x.size for x in jax.tree.leaves(params))), 'layers': layers,
      'dtype': dtype, 'max_shard_bytes': max_shard_bytes, 'files': len(files),
      'weight_bytes': weight_bytes, 'export_s': seconds,
      'rss_params_bytes': (with_params_kib - baseline_kib) * 1024,
      'peak_over_weight_bytes': (peak_kib - baseline_kib) * 1024 / weight_bytes,
  }


def _child(argv: list[str]) -> None:
  params_m, dtype, shard, directory = argv
  print(json.dumps(measure(float(params_m), dtype, int(shard), directory)))


def main(argv):
  del argv
  rows = []
  for params_m in map(float, FLAGS.params_m):
    # One file (transformers' 5 GB default holds these sizes), and shards of a quarter of the
    # bf16 weights (several files and an index).
    for dtype, shard in (('float32', 10**10), ('bfloat16', 10**10),
                         ('bfloat16', int(params_m * 1e6 * 2 / 4))):
      with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run(
            [sys.executable, '-c', 'import sys; from experiments import bench_export as b; '
             'b._child(sys.argv[1:])', str(params_m), dtype, str(shard), d],
            cwd=_ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f'{row["params"] / 1e6:7.1f}M params, {dtype:8s}: {row["files"]} file(s), '
              f'{row["export_s"]:.2f} s, peak {row["peak_over_weight_bytes"]:.3f} x weight bytes')
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
      json.dump({'command': 'python -m experiments.bench_export ' + ' '.join(sys.argv[1:]),
                 'machine': os.uname().machine, 'cpus': os.cpu_count(), 'rows': rows}, f,
                indent=2)
      f.write('\n')


if __name__ == '__main__':
  app.run(main)
