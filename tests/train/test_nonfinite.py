"""Non-finite steps are never applied or saved (train.on_nonfinite = stop | skip), the train
log stays strict JSON, and a finished run is recorded exactly once."""

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

import efficientjax.train.loop as loop_module
from efficientjax import parallel
from efficientjax.metrics import record as records
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.checkpoint import NonFiniteCheckpoint
from efficientjax.train.loop import TrainingDiverged, train
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import make_train_step
from experiments import pretrain
from tests.helpers import smoke_config

ONE = jax.devices()[:1]
# Past the padded vocabulary (384 rows): the embedding lookup fills such rows with NaN, as a
# corrupted data shard would poison a real run.
BAD_TOKEN = 10**6
# pretrain.run shards over every device (conftest makes 8): a batch they can split.
ALL_DEVICES = {'train.global_batch_size': 8}


def _log(workdir):
  """train_log.jsonl, parsed strictly: NaN / Infinity are not JSON."""
  def refuse(constant):
    raise ValueError(f'non-JSON constant {constant} in the train log')
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _checkpoint_arrays(workdir, step):
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _poison_batches(monkeypatch, steps):
  """The data stream yields a batch with an out-of-vocabulary token at these (1-based) steps."""
  real = loop_module.build_data

  def build(**kwargs):
    data = real(**kwargs)
    next_batch, count = data.train.next, [0]

    def poisoned():
      batch = next_batch()
      count[0] += 1
      if count[0] in steps:
        batch = batch.copy()
        batch[0, 0] = BAD_TOKEN
      return batch
    data.train.next = poisoned
    return data
  monkeypatch.setattr(loop_module, 'build_data', build)


def test_a_nonfinite_step_leaves_the_state_untouched():
  c = smoke_config()
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], ONE)
  _, shardings = state_shardings(model, tx, mesh, 16)
  state = init_state(model, tx, mesh, 16, 0, shardings)
  step = jax.jit(make_train_step(model, tx, grad_accum_steps=2))
  batch = np.asarray(jax.random.randint(jax.random.key(3), (4, 17), 0, 257))
  good, _ = step(state, batch)  # the warm-up's first learning rate is 0: a second step moves
  good, metrics = step(good, batch)
  assert bool(metrics['finite'])
  assert not np.array_equal(good.params['embed']['embedding'], state.params['embed']['embedding'])
  bad_batch = batch.copy()
  bad_batch[1, 3] = BAD_TOKEN
  after, metrics = step(good, bad_batch)
  assert not bool(metrics['finite']) and not math.isfinite(float(metrics['loss']))
  assert int(after.step) == int(good.step) + 1  # the batch is used up; the update is not applied
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (good.params, good.opt_state))


def test_divergence_stops_with_finite_checkpoints_and_advice_that_works(tmp_path):
  workdir = str(tmp_path)
  c = smoke_config(**{'train.learning_rate': 1e6, 'train.steps': 6, 'train.checkpoint_every': 1,
                      'train.keep_checkpoints': 10, 'train.eval_every': 0,
                      'train.timing_warmup_steps': 1})
  with pytest.raises(TrainingDiverged) as e:
    train(c, workdir, devices=ONE, progress=False)
  message = str(e.value)
  step = int(message.split('step ')[1].split(' ')[0])
  assert 'was not finite' in message and 'train.learning_rate' in message
  assert 'train.resume_step' in message
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert saved and saved[-1] == step - 1
  assert f'the newest checkpoint, step {step - 1} in' in message
  for s in saved:  # no checkpoint holds a NaN or an inf
    assert all(np.isfinite(a).all() for a in _checkpoint_arrays(workdir, s) if a.dtype.kind == 'f')
  log = _log(workdir)  # strict JSON even though the loss was NaN
  last = log[-1]
  assert last['step'] == step and last['nonfinite'] and not last['applied']
  # The loss is computed before the update and may still be finite; what was not is null.
  assert last['nonfinite_fields'] and all(last[f] is None for f in last['nonfinite_fields'])
  # The advice: a lower learning rate, from an earlier checkpoint, in the same workdir.
  c['train'].update(learning_rate=3e-3, resume_step=saved[0])
  resumed = train(c, workdir, devices=ONE, progress=False)
  assert resumed.start_step == saved[0] and resumed.final_step == 6
  assert all(math.isfinite(v) for v in resumed.losses.values())
  # The same command again (as after a kill) goes on from the newest checkpoint: it does not
  # go back to train.resume_step a second time.
  set_aside = sorted(os.listdir(os.path.join(workdir, 'checkpoints_set_aside')))
  again = train(c, workdir, devices=ONE, progress=False)
  assert again.start_step == 6 and not again.losses
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_set_aside'))) == set_aside


def test_skip_drops_a_poisoned_batch_and_the_record_counts_it(tmp_path, monkeypatch):
  # Steps 3-5 are profiled, so the skipped step 4 happens inside the trace.
  c = smoke_config(**{'train.on_nonfinite': 'skip', 'train.steps': 6, 'profile.steps': 3,
                      'train.timing_warmup_steps': 2, **ALL_DEVICES})
  _poison_batches(monkeypatch, {4})
  pretrain.run(ConfigDict(c), str(tmp_path))
  [record] = records.read_records(str(tmp_path / records.RESULTS_FILE))
  records.validate_record(record)
  assert record['steps']['skipped'] == 1 and record['steps']['skipped_at'] == [4]
  assert record['steps']['final'] == 6 and math.isfinite(record['quality']['eval_loss'])
  log = _log(str(tmp_path))
  assert [r['step'] for r in log] == [1, 2, 3, 4, 5, 6]
  assert not log[3]['applied'] and log[3]['loss'] is None
  assert not any(r.get('nonfinite') for r in log[:3] + log[4:])
  # The skipped update did not advance the optimizer's schedule: step 5 used the rate step 4
  # would have (warm-up over 2 updates, then the cosine over the 4 left), and the log says so.
  def rate(t):  # smoke: peak 3e-3, floor 3e-4
    return 3e-3 * t / 2 if t < 2 else 3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4))
  rates = [rate(t) for t in (0, 1, 2, 3, 3, 4)]
  assert [r['learning_rate'] for r in log] == pytest.approx(rates, rel=1e-6)


def test_too_many_skips_stop_the_run(tmp_path, monkeypatch):
  c = smoke_config(**{'train.on_nonfinite': 'skip', 'train.max_skipped_steps': 1,
                      'train.eval_every': 0})
  _poison_batches(monkeypatch, {2, 4})
  with pytest.raises(TrainingDiverged, match=r'2 steps were not finite \(the last at step 4\), '
                     r'more than train.max_skipped_steps=1'):
    train(c, str(tmp_path), devices=ONE, progress=False)
  # The first skip was saved with the checkpoint at step 3, so a restart keeps counting it.
  meta = json.load(open(tmp_path / 'checkpoints' / '3' / 'meta' / 'metadata'))
  assert meta['skipped_steps'] == [2]
  # The trace machinery was left clean: a new trace can start.
  jax.profiler.start_trace(str(tmp_path / 'after'))
  jax.profiler.stop_trace()


def test_a_state_that_overflowed_is_never_saved(tmp_path, monkeypatch):
  # The step checks loss and gradients; a finite update that overflows the parameters is
  # caught where the state would be saved. Simulated: the check fails at the save of step 4.
  real = loop_module.check_finite
  calls = []

  def check(state):
    calls.append(int(state.step))
    real(state)
    if int(state.step) == 4:
      raise NonFiniteCheckpoint('params[embed] holds 1 non-finite value(s) of 49152')
  monkeypatch.setattr(loop_module, 'check_finite', check)
  c = smoke_config(**{'train.checkpoint_every': 2, 'train.eval_every': 0})
  with pytest.raises(TrainingDiverged, match=r'the state after step 4 is not finite \(params\[embed\] '
                     r'holds 1 .* it was not saved; the newest checkpoint, step 2 in'):
    train(c, str(tmp_path), devices=ONE, progress=False)
  assert calls == [2, 4]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_a_finished_run_is_recorded_exactly_once(tmp_path, capsys):
  c = ConfigDict(smoke_config(**ALL_DEVICES))
  path = pretrain.run(c, str(tmp_path))
  assert len(records.read_records(path)) == 1
  pretrain.run(c, str(tmp_path))  # rerun with the same arguments
  assert 'already complete' in capsys.readouterr().out
  assert len(records.read_records(path)) == 1
  # Killed after its last checkpoint but before its record: the restart writes the record,
  # with the held-out loss of the trained state and the lost timings said to be lost.
  os.remove(path)
  pretrain.run(c, str(tmp_path))
  [record] = records.read_records(path)
  records.validate_record(record)
  assert record['steps']['start'] == record['steps']['final'] == 6
  assert math.isfinite(record['quality']['eval_loss'])
  assert 'resumed at the final step' in record['metrics']['latency']['reason']
  pretrain.run(c, str(tmp_path))
  assert len(records.read_records(path)) == 1


def test_a_record_torn_by_a_kill_does_not_hide_the_next(tmp_path):
  path = tmp_path / records.RESULTS_FILE
  path.write_text('{"kind": "pretrain", "steps": {"fi')  # a kill mid-append
  records.write_record(str(tmp_path), {'kind': 'pretrain', 'n': 1})
  assert records.read_records(str(path), strict=False) == [{'kind': 'pretrain', 'n': 1}]
  with pytest.raises(json.JSONDecodeError):
    records.read_records(str(path))
