"""Training-step time and memory of an MoE model under each dispatch strategy and each grouped
matmul of the `dropless` strategy: the same config trained a few steps per variant, each row
read from the run's own metrics (step p50/p90 after warm-up, tokens/s, XLA's memory estimate
of the compiled step, dropped-token fraction, loss). The device's peak-bytes counter is kept
too, but it is process-wide and never reset, so after the first row it is the maximum so far:
compare rows by `compiler_estimate_bytes` (or run one variant per process). Rows that fail (out of memory, an implementation
missing, e.g. tokamax not installed) record the error and the rest go on.

  python -m experiments.bench_moe_dispatch --config=configs/moe_16b.py:1gpu --out=FILE.json
      [--variants=dense,capacity,dropless:ragged_dot,dropless:triton] [--steps=N]
"""

import json
import os
import tempfile
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from efficientjax.metrics.report import training_metrics
from efficientjax.train.loop import train
from experiments import validate

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/moe_16b.py:1gpu', 'the MoE config')
_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')
_VARIANTS = flags.DEFINE_list(
    'variants', ['dense', 'capacity', 'dropless:ragged_dot', 'dropless:triton', 'dropless:tokamax'],
    'dispatch[:grouped_matmul] per row')
_STEPS = flags.DEFINE_integer('steps', None, 'override train.steps (None: the config\'s)')


def run_variant(base: dict, variant: str) -> dict:
  dispatch, _, gmm = variant.partition(':')
  config = json.loads(json.dumps(base))
  config['model']['moe']['dispatch'] = dispatch
  if gmm:
    config['model']['moe']['grouped_matmul'] = gmm
  errors = validate.check(config)
  if errors:
    raise ValueError('; '.join(str(e) for e in errors))
  with tempfile.TemporaryDirectory() as workdir:
    result = train(config, workdir, progress=False)
  m = training_metrics(result, peak_override=config['metrics']['peak_flops_per_s'])
  return {
      'step_ms': m['latency']['step_ms'],
      'tokens_per_s': m['throughput']['tokens_per_s'],
      'mfu_analytic': m['compute']['mfu_analytic'],
      'memory': {k: m['memory'][k] for k in ('bytes_in_use_peak', 'bytes_limit',
                                             'host_rss_bytes_peak', 'compiler_estimate_bytes')},
      'dropped_fraction': result.moe['dropped_fraction'],
      'max_over_mean_load': result.moe['max_over_mean_load'],
      'final_train_loss': result.losses[max(result.losses)],
  }


def main(argv):
  del argv
  base = _CONFIG.value.to_dict()
  if _STEPS.value:
    base['train']['steps'] = _STEPS.value
  base['train']['checkpoint_every'] = 0
  rows = []
  result = {'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
            'jax': jax.__version__, 'config': base, 'rows': rows}
  for variant in _VARIANTS.value:
    row = {'variant': variant}
    try:
      row.update(run_variant(base, variant))
      print(f'{variant}: step p50 {row["step_ms"]["p50"]:.1f} ms, '
            f'{row["tokens_per_s"]:.0f} tok/s', flush=True)
    except Exception as e:  # noqa: BLE001 - a failed row is a result
      row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
      traceback.print_exc()
      print(f'{variant}: {row["error"]}', flush=True)
    rows.append(row)
    if _OUT.value:  # after every row: a run cut short keeps what it measured
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      with open(_OUT.value, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
