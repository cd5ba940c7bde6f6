"""`kind = 'inference'`: serve a workload with a model at one precision (efficientjax/quant)
and record latency, throughput, memory, bandwidth, energy and compression beside quality
against bf16 on the same tokens (efficientjax/infer/run.py does the work)."""

import os

from ml_collections import ConfigDict

from efficientjax.infer import run as infer_run
from efficientjax.metrics import record as records
from efficientjax.metrics.report import inference_metrics
from efficientjax.train import execution
from experiments.pretrain import _guard_workdir

# Requests' tokens are kept in the record only up to this many requests (a sample to read).
RECORDED_REQUESTS = 16


def run(config: ConfigDict, workdir: str) -> str:
  cfg = config.to_dict()
  _guard_workdir(workdir, cfg)
  result = infer_run.run(cfg, workdir)
  record = records.new_record(cfg['kind'], cfg)
  record.update({
      'workdir': os.path.abspath(workdir),
      'env': records.environment({'devices': 1}),
      'model': {'params': result.num_params, 'weight_bytes': result.weight_bytes,
                'config': result.model_config.to_dict(), 'init': result.init,
                'attention_impl': result.model_config.attention_impl},
      'inference': {'precision': result.precision, 'workload': result.workload,
                    'quantize_s': result.quantize_s,
                    'requests': [{'id': c.id, 'prompt_len': c.prompt_len,
                                  'output_len': len(c.tokens), 'finish_reason': c.finish_reason,
                                  'tokens': c.tokens}
                                 for c in result.completions[:RECORDED_REQUESTS]]},
      'data': {'corpus': cfg['data']['corpus'], **result.data_stats},
      'quality': result.quality,
      'metrics': inference_metrics(
          result, peak_override=cfg['metrics']['peak_flops_per_s'],
          bandwidth_override=cfg['metrics']['peak_bandwidth_bytes_per_s']),
      # How prefill and decode ran (jit | eager), and the hash that pairs it with its other mode.
      'execution': {**execution.record(cfg), 'mode': result.execution},
      'tensorboard_dir': result.curves_dir,
  })
  return records.write_record(workdir, record)
