"""`kind = 'pretrain'`: train a model from scratch and record quality and cost."""

import json
import math
import os
from typing import Any

import jax
from ml_collections import ConfigDict

from efficientjax.errors import ConfigError
from efficientjax.metrics import record as records
from efficientjax.metrics.report import training_metrics
from efficientjax.moe.report import inactive_params
from efficientjax.train.loop import train

# Sections that define what a checkpoint holds: resuming under other values would mix runs.
_RESUME_SECTIONS = ('model', 'data', 'seed')


def _guard_workdir(workdir: str, config: dict[str, Any]) -> None:
  """Refuses to resume a workdir written by a different model, data or seed, and keeps the
  config beside the checkpoints so a restart can be checked."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = [s for s in _RESUME_SECTIONS if before.get(s) != config.get(s)]
    if changed and os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise ConfigError('--workdir', f'{workdir} holds checkpoints of a run whose '
                        f'{", ".join(changed)} differ from this config; use a new --workdir '
                        '(nothing there is overwritten)')
  if jax.process_index() == 0:  # one writer on a shared file system
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)


def run(config: ConfigDict, workdir: str) -> str:
  cfg = config.to_dict()
  _guard_workdir(workdir, cfg)
  result = train(cfg, workdir)
  record = records.new_record('pretrain', cfg)
  last = sorted(result.losses)[-10:]
  eval_loss = result.final_eval_loss
  record.update({
      'workdir': os.path.abspath(workdir),
      'env': records.environment(result.mesh_shape),
      'model': {'params': result.num_params, 'weight_bytes': result.weight_bytes,
                'config': result.model_config.to_dict(),
                'attention_impl': result.attention_impl, 'attention': result.attention},
      'data': {'corpus': cfg['data']['corpus'], **result.data_stats},  # stats say if synthetic
      'steps': {'start': result.start_step, 'final': result.final_step,
                'tokens_per_step': result.tokens_per_step},
      'quality': {
          # Mean over the last (up to) 10 steps: one step's loss is too noisy to compare runs.
          'train_loss': sum(result.losses[s] for s in last) / len(last) if last else None,
          'eval_loss': eval_loss,
          'eval_perplexity': math.exp(eval_loss) if eval_loss is not None else None,
          'initial_eval_loss': result.initial_eval_loss,
          'initial_eval_perplexity': (math.exp(result.initial_eval_loss)
                                      if result.initial_eval_loss is not None else None),
      },
      'metrics': training_metrics(result, peak_override=cfg['metrics']['peak_flops_per_s']),
      'checkpoint_dir': result.checkpoint_dir,
  })
  if result.moe is not None:
    # Expert load, dropped tokens, balancing losses and biases; and what a token computes with.
    record['moe'] = {**result.moe,
                     'params_active': result.num_params - inactive_params(result.model_config)}
  return records.write_record(workdir, record)
