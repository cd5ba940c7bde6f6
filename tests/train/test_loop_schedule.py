"""The loop does what configs/base.py says of its schedule: evaluations every train.eval_every
steps and at the end, checkpoints every train.checkpoint_every steps keeping the newest
train.keep_checkpoints, timings after train.timing_warmup_steps, one log line per step."""

import json
import os

import jax

from efficientjax.train.loop import train
from tests.helpers import smoke_config


def test_evaluations_checkpoints_and_timed_steps_fall_where_the_config_puts_them(tmp_path):
  c = smoke_config(**{'model.num_layers': 1, 'train.steps': 5, 'train.eval_every': 2,
                      'train.checkpoint_every': 1, 'train.keep_checkpoints': 2,
                      'train.async_checkpoint': False, 'train.timing_warmup_steps': 1})
  result = train(c, str(tmp_path), devices=jax.devices()[:1], progress=False)
  assert sorted(result.eval_losses) == [2, 4, 5]  # every 2 steps, and the last
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['4', '5']  # newest 2 kept
  assert sorted(result.losses) == [1, 2, 3, 4, 5]
  # Steps 2..5 are timed: one warm-up step is left out.
  assert len(result.step_times_s) == result.window_steps == 4
  assert result.tokens_per_step == 4 * 64 and result.samples_per_step == 4
  assert result.final_eval_loss == result.eval_losses[5]
  with open(tmp_path / 'train_log.jsonl') as f:
    log = [json.loads(line) for line in f]
  assert [line['step'] for line in log] == [1, 2, 3, 4, 5]
  assert [line['loss'] for line in log] == [result.losses[s] for s in range(1, 6)]


def test_eval_every_zero_evaluates_only_at_the_start_and_the_end(tmp_path):
  c = smoke_config(**{'model.num_layers': 1, 'train.steps': 3, 'train.eval_every': 0,
                      'train.checkpoint_every': 0})
  result = train(c, str(tmp_path), devices=jax.devices()[:1], progress=False)
  assert result.initial_eval_loss is not None and sorted(result.eval_losses) == [3]
  assert not os.path.exists(tmp_path / 'checkpoints')
