"""A run's TensorBoard curves, read back by TensorBoard's own reader (EventAccumulator, not
tensorboardX which wrote them), equal what the run measured and sit beside its trace.

One profiled pretraining run at smoke size through the runner the CLI calls. The inference
run's curves are checked in tests/train/test_execution.py, on the runs it makes anyway.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from tensorboard.backend.event_processing import event_accumulator

from efficientjax.metrics.record import read_records, validate_record
from efficientjax.metrics.sampler import Sampler
from efficientjax.metrics.tensorboard import sampled
from efficientjax.train.loop import train
from experiments import validate
from experiments.pretrain import run_training
from tests.helpers import smoke_config


def read_scalars(logdir) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of every scalar in the event files of `logdir` (one run)."""
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={
      event_accumulator.SCALARS: 0})  # 0: keep every event, not a sample of them
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}


def f32(x: float) -> float:
  """What an event file holds of a number: a float32."""
  return float(np.float32(x))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  config = smoke_config(**{'train.steps': 4, 'train.warmup_steps': 1, 'train.eval_every': 2,
                           'train.eval_batches': 1, 'train.checkpoint_every': 0,
                           'train.timing_warmup_steps': 1, 'profile.steps': 1})
  assert validate.check(config, num_devices=1) == []
  results = []

  def train_fn(cfg, wd):
    results.append(train(cfg, wd, devices=jax.devices()[:1], progress=False))
    return results[-1]
  (record,) = read_records(run_training(ConfigDict(config), str(workdir), train_fn))
  validate_record(record)
  with open(workdir / 'train_log.jsonl') as f:
    log = [json.loads(line) for line in f]
  return record, results[0], log, read_scalars(record['tensorboard_dir'])


def test_event_files_sit_beside_the_trace(run):
  record, _, _, _ = run
  logdir = record['tensorboard_dir']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(logdir))
  # TensorBoard's profile plugin reads <run dir>/plugins/profile/<session>/*.xplane.pb: the
  # record's own trace must be there, under the same run directory as the curves.
  trace_path = record['metrics']['trace']['trace_path']
  assert record['metrics']['trace']['available'], record['metrics']['trace']
  session = os.path.dirname(trace_path)
  assert trace_path.endswith('.xplane.pb')
  assert os.path.dirname(session) == os.path.join(logdir, 'plugins', 'profile')


def test_loss_curve_is_the_runs_losses(run):
  _, result, log, scalars = run
  assert scalars['train/loss'] == {s: f32(v) for s, v in result.losses.items()}
  assert sorted(scalars['train/loss']) == [1, 2, 3, 4]
  # Each step's throughput is the tokens of its batch over its logged time.
  tokens = result.tokens_per_step
  assert scalars['train/tokens_per_s'] == pytest.approx(
      {line['step']: f32(tokens / (line['step_ms'] / 1e3)) for line in log}, rel=1e-6)
  assert scalars['train/learning_rate'] == {l['step']: f32(l['learning_rate']) for l in log}


def test_eval_curve_ends_at_the_records_eval_loss(run):
  record, result, _, scalars = run
  q = record['quality']
  evals = scalars['eval/loss']
  assert sorted(evals) == [0, 2, 4]  # before the first step, every 2 steps, the last
  assert evals[0] == f32(q['initial_eval_loss'])
  assert evals[4] == f32(q['eval_loss'])
  assert evals[2] == f32(result.eval_losses[2])
  assert scalars['eval/perplexity'][4] == pytest.approx(math.exp(q['eval_loss']), rel=1e-6)


def test_memory_and_power_curves_only_where_measured(run):
  record, _, _, scalars = run
  memory, energy = record['metrics']['memory'], record['metrics']['energy']
  window = {3, 4}  # after one warm-up and one profiled step
  # Sampled while the window was open; a reading the backend lacks (a CPU's device memory,
  # power without NVML or RAPL) is absent, never a zero.
  if memory['host_rss_bytes_mean'] is None:
    assert 'memory/host_rss_bytes' not in scalars
  else:
    assert set(scalars['memory/host_rss_bytes']) == window
    assert all(v > 0 for v in scalars['memory/host_rss_bytes'].values())
  if memory['bytes_in_use_mean'] is None:
    assert 'memory/bytes_in_use' not in scalars
  else:
    assert set(scalars['memory/bytes_in_use']) == window
  if energy.get('avg_power_w_sampled') is None:
    assert 'power/power_w' not in scalars
  else:
    assert set(scalars['power/power_w']) <= window


class _Meter:
  """An energy meter whose instantaneous power readings are scripted (None: no reading)."""
  name, scope, reason = 'fake', 'gpu', None

  def __init__(self, power):
    self._power = iter(power)

  def power_w(self):
    return next(self._power)


def test_the_memory_curve_reads_the_newest_sample_only_where_it_has_every_reading():
  """Sampler.latest, the curves' source: the newest sample's device bytes summed over devices,
  RSS and power; a reading missing from that sample is None, never an older one."""
  memory = {0: iter([{'bytes_in_use': 100}, {'bytes_in_use': 300}, {'bytes_in_use': 5},
                     {'bytes_in_use': 7}]),
            1: iter([{'bytes_in_use': 10}, {'bytes_in_use': 30}, None, {'bytes_in_use': 1}])}
  rss = iter([1000, 2000, None, 3000])
  sampler = Sampler(devices=[0, 1], energy_meter=_Meter([[1.0, 2.0], [3.0, 4.0], None, [5.0]]),
                    read_memory=lambda device: next(memory[device]), read_rss=lambda: next(rss))
  assert sampled(sampler.latest()) == {'memory/bytes_in_use': None,
                                       'memory/host_rss_bytes': None, 'power/power_w': None}
  sampler.sample_once()
  sampler.sample_once()
  assert sampler.latest() == {'bytes_in_use': 330, 'host_rss_bytes': 2000, 'power_w': 7.0}
  sampler.sample_once()  # device 1, the RSS and the power have no reading this time
  assert sampler.latest() == {'bytes_in_use': None, 'host_rss_bytes': None, 'power_w': None}
  sampler.sample_once()  # and every reading again
  assert sampler.latest() == {'bytes_in_use': 8, 'host_rss_bytes': 3000, 'power_w': 5.0}


def test_nothing_is_written_until_a_flush(tmp_path):
  """A step's scalars cost a list append; the event file is written at `flush()` (which the
  loop calls only with its timed window paused) and at `close()`."""
  from efficientjax.metrics.tensorboard import Curves  # pylint: disable=g-import-not-at-top
  curves = Curves(str(tmp_path), enabled=True)
  curves.scalars({'train/loss': 2.5, 'memory/host_rss_bytes': None}, 1)
  assert read_scalars(tmp_path) == {}
  curves.flush()
  assert read_scalars(tmp_path) == {'train/loss': {1: 2.5}}
  curves.scalar('train/loss', 2.25, 2)
  curves.close()
  assert read_scalars(tmp_path) == {'train/loss': {1: 2.5, 2: 2.25}}
