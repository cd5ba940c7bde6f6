"""`kind = 'pretrain'`: train a model from scratch and record quality and cost.

`run_training` is what every training kind shares (the workdir guard, the completed-run check,
the record); experiments/finetune.py calls it with the fine-tuning loop."""

import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from efficientjax.errors import ConfigError
from efficientjax.metrics import record as records
from efficientjax.metrics.report import training_metrics
from efficientjax.moe.report import inactive_params
from efficientjax.train import execution
from efficientjax.train.loop import TrainResult, train

# Sections that define what a checkpoint holds: resuming under other values would mix runs.
_RESUME_SECTIONS = ('model', 'data', 'seed')


def _guard_workdir(workdir: str, config: dict[str, Any], sections: tuple[str, ...] = ()) -> None:
  """Refuses to resume a workdir written by a different model, data or seed (or `sections`),
  and keeps the config beside the checkpoints so a restart can be checked."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = [s for s in _RESUME_SECTIONS + ('kind',) + sections
               if before.get(s) != config.get(s)]
    if changed and os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise ConfigError('--workdir', f'{workdir} holds checkpoints of a run whose '
                        f'{", ".join(changed)} differ from this config; use a new --workdir '
                        '(nothing there is overwritten)')
  if jax.process_index() == 0:  # one writer on a shared file system
    os.makedirs(workdir, exist_ok=True)
    # Whole or not at all: the other processes may be reading it (above) meanwhile.
    with open(path + '.tmp', 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def completed_record(workdir: str, config: dict[str, Any]) -> dict[str, Any] | None:
  """The record of this workdir's run if it already reached train.steps, else None."""
  path = os.path.join(workdir, records.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  done = [r for r in records.read_records(path, strict=False)
          if r.get('kind') == config['kind'] and r.get('steps', {}).get('final', -1)
          >= config['train']['steps']]
  return done[-1] if done else None


def run(config: ConfigDict, workdir: str) -> str:
  return run_training(config, workdir, train)


def run_training(config: ConfigDict, workdir: str,
                 train_fn: Callable[[dict[str, Any], str], TrainResult],
                 sections: tuple[str, ...] = ()) -> str:
  """Trains (or resumes) with `train_fn` and writes the record: what every training kind
  shares. sections: config sections besides model, data and seed that a resume must match."""
  cfg = config.to_dict()
  _guard_workdir(workdir, cfg, sections)
  done = completed_record(workdir, cfg)
  if done is not None:
    # Rerunning a finished run (or restarting one killed after its record was written) must
    # not append a second record.
    path = os.path.join(workdir, records.RESULTS_FILE)
    if jax.process_index() == 0:
      print(f'this run is already complete: it reached step {done["steps"]["final"]} '
            f'(train.steps={cfg["train"]["steps"]}) and its record ({done["run_id"]}, '
            f'{done["created_at"]}) is in {path}. Raise --config.train.steps to train '
            'further, or use a new --workdir to run again.')
    return path
  result = train_fn(cfg, workdir)
  record = records.new_record(cfg['kind'], cfg)
  last = sorted(result.losses)[-10:]
  eval_loss = result.final_eval_loss
  record.update({
      'workdir': os.path.abspath(workdir),
      'env': records.environment(result.mesh_shape),
      'model': {'params': result.num_params, 'weight_bytes': result.weight_bytes,
                'config': result.model_config.to_dict(),
                'attention_impl': result.attention_impl, 'attention': result.attention,
                # Where the initial weights came from (model.init), or None: random.
                'init': result.init,
                # What the optimizer updated, and the memory its state took.
                'trainable_params': result.trainable_params,
                'optimizer_state_bytes': result.optimizer_state_bytes},
      'data': {'corpus': cfg['data']['corpus'], **result.data_stats},  # stats say if synthetic
      'steps': {'start': result.start_step, 'final': result.final_step,
                'tokens_per_step': result.tokens_per_step,
                # Updates dropped as non-finite (train.on_nonfinite='skip'), restarts included.
                'skipped': len(result.skipped_steps), 'skipped_at': result.skipped_steps},
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
      # How the steps ran (jit | eager), and the hash that pairs this run with its other mode.
      'execution': {**execution.record(cfg), 'mode': result.execution},
      'tensorboard_dir': result.curves_dir,
  })
  if result.finetune is not None:
    record['finetune'] = result.finetune
  if result.moe is not None:
    # Expert load, dropped tokens, balancing losses and biases; and what a token computes with.
    record['moe'] = {**result.moe,
                     'params_active': result.num_params - inactive_params(result.model_config)}
  return records.write_record(workdir, record)
