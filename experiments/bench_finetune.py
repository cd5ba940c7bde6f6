"""Step time and memory of each fine-tuning method on one config (the study's Llama-3.2-1B
shape by default), each method in its own process so that the device's peak-memory counter
is that method's alone.

Each row is read from the run's own record metrics: step p50/p90 after warm-up, tokens/s,
samples/s, analytic MFU, the device's peak bytes in use and XLA's memory estimate of the
compiled step, trainable parameters and optimizer-state bytes, the final train loss. The
summary gives the issue's ratios: LoRA's step-time speed-up and memory saving over full
fine-tuning, and DoRA's step time over LoRA's. The base is random unless the config names
one (`model.init`): costs do not depend on the weights.

  python -m experiments.bench_finetune --out=FILE.json [--methods=full,lora,dora]
      [--config=configs/finetune_lora.py] [--steps=12] [--batch=8] [--seq_len=1024]
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback

from absl import app, flags
from ml_collections import config_flags

_METHODS = flags.DEFINE_list(
    'methods', ['full', 'freeze', 'lora', 'lora_plus', 'rslora', 'dora', 'pissa'],
    'finetune.method per row')
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/finetune_lora.py',
                                           'the config file[:preset]')
_STEPS = flags.DEFINE_integer('steps', 12, 'train.steps per method (warm-up steps excluded)')
_BATCH = flags.DEFINE_integer('batch', 8, 'train.global_batch_size')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'data.seq_len')
_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')
_ROW = flags.DEFINE_string('row', None, '(internal) run this one method, write its row here')


def _config_path() -> str:
  return config_flags.get_config_filename(flags.FLAGS['config'])


def row_config(base: dict, method: str, steps: int, batch: int, seq_len: int) -> dict:
  """The config of one method's row: `base` (a config as a dict) at the benchmark's size."""
  config = json.loads(json.dumps(base))
  config['finetune']['method'] = method
  if method in ('full', 'freeze'):
    config['finetune']['base_dtype'] = None
    config['train']['learning_rate'] = 2e-5
  # The schedule does not change a step's cost; its warm-up must still fit the short run.
  warmup = min(config['train']['warmup_steps'], steps // 10)
  config['train'].update(steps=steps, warmup_steps=warmup, global_batch_size=batch,
                         eval_every=0, eval_batches=1, checkpoint_every=0)
  config['finetune']['export'] = 'none'
  config['data']['seq_len'] = seq_len
  return config


def _config(method: str) -> dict:
  return row_config(_CONFIG.value.to_dict(), method, _STEPS.value, _BATCH.value,
                    _SEQ_LEN.value)


def run_method(method: str) -> dict:
  """One method's row, in this process."""
  from efficientjax.metrics.report import training_metrics  # pylint: disable=g-import-not-at-top
  from efficientjax.train.finetune import finetune  # pylint: disable=g-import-not-at-top
  from experiments import validate  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = _config(method)
  errors = validate.check(config)
  if errors:
    raise ValueError('; '.join(str(e) for e in errors))
  with tempfile.TemporaryDirectory() as workdir:
    result = finetune(config, workdir, progress=False)
  m = training_metrics(result, peak_override=config['metrics']['peak_flops_per_s'])
  return {
      'method': method, 'device': jax.devices()[0].device_kind,
      'step_ms': m['latency']['step_ms'],
      'tokens_per_s': m['throughput']['tokens_per_s'],
      'samples_per_s': m['throughput']['samples_per_s'],
      'mfu_analytic': m['compute']['mfu_analytic'],
      'analytic_flops_per_step': m['compute']['analytic_flops_per_step'],
      'memory': {k: m['memory'][k] for k in ('bytes_in_use_peak', 'bytes_limit',
                                             'host_rss_bytes_peak', 'compiler_estimate_bytes')},
      'trainable_params': result.trainable_params,
      'optimizer_state_bytes': result.optimizer_state_bytes,
      'finetune': result.finetune,
      'final_train_loss': result.losses[max(result.losses)],
  }


def _ratios(rows: dict) -> dict:
  """The issue's goals: LoRA ≥ 1.3× faster per step than full with ≥ 40% less peak memory;
  DoRA at most 1.5× LoRA's step time."""
  def p50(m):
    return rows.get(m, {}).get('step_ms', {}).get('p50')

  def peak(m):
    return (rows.get(m, {}).get('memory') or {}).get('bytes_in_use_peak')
  out = {}
  if p50('full') and p50('lora'):
    out['lora_speedup_over_full'] = p50('full') / p50('lora')
  if peak('full') and peak('lora'):
    out['lora_memory_saving_vs_full'] = 1 - peak('lora') / peak('full')
  if p50('dora') and p50('lora'):
    out['dora_step_over_lora'] = p50('dora') / p50('lora')
  return out


def main(argv):
  del argv
  if _ROW.value:
    method = _METHODS.value[0]
    try:
      row = run_method(method)
    except Exception as e:  # noqa: BLE001 - a failed row is a result
      traceback.print_exc()
      row = {'method': method, 'error': f'{type(e).__name__}: {str(e)[:400]}'}
    with open(_ROW.value, 'w') as f:
      json.dump(row, f)
    return
  rows: dict = {}
  result = {'config': _config_path(), 'steps': _STEPS.value, 'batch': _BATCH.value,
            'seq_len': _SEQ_LEN.value, 'rows': rows}
  for method in _METHODS.value:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'row.json')
      argv = [sys.executable, '-m', 'experiments.bench_finetune', f'--methods={method}',
              f'--row={path}', f'--config={_config_path()}', f'--steps={_STEPS.value}',
              f'--batch={_BATCH.value}', f'--seq_len={_SEQ_LEN.value}']
      proc = subprocess.run(argv, check=False)
      if os.path.exists(path):
        with open(path) as f:
          rows[method] = json.load(f)
      else:
        rows[method] = {'method': method, 'error': f'exit status {proc.returncode}, no row'}
    row = rows[method]
    print(f'{method}: ' + (row['error'] if 'error' in row else
                           f'step p50 {row["step_ms"]["p50"]:.1f} ms, peak '
                           f'{row["memory"]["bytes_in_use_peak"]}'), flush=True)
    result['ratios'] = _ratios(rows)
    if _OUT.value:  # after every row: a run cut short keeps what it measured
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      with open(_OUT.value, 'w') as f:
        json.dump(result, f, indent=1)
  print(json.dumps(result['ratios']), flush=True)
  if all('error' in row for row in rows.values()):
    sys.exit('every row failed: see the rows\' errors')  # the GPU-check runner marks it failed


if __name__ == '__main__':
  app.run(main)
