"""A damaged, non-finite or unwanted checkpoint is reported in one paragraph, set aside (never
deleted), and the run continues from an older one with the losses of a run that never had it."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax import parallel
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train import checkpoint as checkpoint_module
from efficientjax.train.checkpoint import MANIFEST, CheckpointError, Checkpointer
from efficientjax.train.loop import train
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import TrainState, state_shardings
from tests.helpers import smoke_config

ONE = jax.devices()[:1]


def _config(**overrides):
  # One layer: these tests compile the same step ten times, and compiling is most of their time.
  return smoke_config(**{'train.steps': 6, 'train.checkpoint_every': 2, 'train.eval_every': 0,
                         'model.num_layers': 1, **overrides})


def _log(workdir):
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run (checkpoints 2, 4, 6): its losses are the reference, and each test
  damages a copy of it and runs it again to step 6 from where it can."""
  workdir = tmp_path_factory.mktemp('integrity') / 'run'
  train(_config(), str(workdir), devices=ONE, progress=False)
  return {r['step']: r['loss'] for r in _log(workdir)}, workdir


def _copy(runs, tmp_path):
  work = tmp_path / 'run'
  shutil.copytree(runs[1], work)
  return work


def _largest_data_file(step_dir):
  files = [os.path.join(r, n) for r, _, names in os.walk(step_dir / 'state') for n in names]
  return max(files, key=os.path.getsize)


def _rewrite(path, change):
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  with open(path, 'wb') as f:
    f.write(change(data))


def _flip_64_bytes(data):
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  return data


# Each damages the checkpoint in the step directory it is given.
DAMAGES = {
    'truncated': lambda d: _rewrite(_largest_data_file(d), lambda b: b[:len(b) // 2]),
    'zeroed': lambda d: _rewrite(_largest_data_file(d), lambda b: bytes(len(b))),
    'random': lambda d: _rewrite(_largest_data_file(d),
                                 lambda b: np.random.default_rng(0).bytes(len(b))),
    'flipped': lambda d: _rewrite(_largest_data_file(d), _flip_64_bytes),
    'cut_meta': lambda d: _rewrite(d / 'meta' / 'metadata', lambda b: b[:len(b) // 2]),
}


def _resume_and_check(work, reference, capsys, *, start, **overrides):
  """Runs the damaged copy again to step 6; checks where it resumed and that every step it ran
  has the uninterrupted run's loss, bitwise. Returns stderr's lines."""
  before = len(_log(work))
  result = train(_config(**overrides), str(work), devices=ONE, progress=False)
  assert result.start_step == start
  ran = _log(work)[before:]
  assert [r['step'] for r in ran] == list(range(start + 1, 7))
  assert [r['loss'] for r in ran] == [reference[r['step']] for r in ran]  # bitwise
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  return err.splitlines()


def _set_aside(work):
  return sorted(os.listdir(work / 'checkpoints_set_aside'))


def test_every_checkpoint_carries_a_manifest(runs):
  checkpoints = runs[1] / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['2', '4', '6']  # no temporary directory left
  for step in ('2', '4', '6'):
    with open(checkpoints / step / MANIFEST) as f:
      files = json.load(f)['files']
    assert 'meta/metadata' in files and any(f.startswith('state/') for f in files)


def test_the_manifest_is_written_before_orbax_commits_the_step(tmp_path, monkeypatch):
  # Inside orbax's temporary directory, which the commit renames: a kill at any moment leaves a
  # committed step with its manifest, or no committed step.
  written = []
  real = checkpoint_module.write_manifest
  monkeypatch.setattr(checkpoint_module, 'write_manifest',
                      lambda directory: (written.append(directory), real(directory)))
  state = TrainState(step=jnp.int32(1), params={'w': jnp.ones(3)}, opt_state={},
                     rng=jax.random.key_data(jax.random.key(0)))
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
  ckpt.save(1, state, {'data': {}})
  ckpt.close()
  assert written == [str(tmp_path / 'checkpoints' / '1.orbax-checkpoint-tmp')]
  assert checkpoint_module.verify_manifest(str(tmp_path / 'checkpoints' / '1'))


def _reports(err):
  return [line for line in err if 'cannot be resumed from' in line]


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_falls_back(runs, tmp_path, capsys,
                                                                       damage):
  work = _copy(runs, tmp_path)
  DAMAGES[damage](work / 'checkpoints' / '6')
  capsys.readouterr()
  err = _resume_and_check(work, runs[0], capsys, start=4)
  [report] = _reports(err)  # one paragraph: one line, no traceback
  assert 'step 6' in report and 'CorruptCheckpoint' in report, report
  assert 'trying the next older checkpoint, step 4' in report
  [aside] = _set_aside(work)
  assert aside.startswith('6-damaged-')
  assert os.path.exists(work / 'checkpoints_set_aside' / aside / 'meta' / 'metadata')  # kept
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4', '6']  # 6 saved afresh


def test_checkpoints_without_manifest_load_and_damage_fails_in_orbax(runs, tmp_path, capsys):
  # As checkpoints saved before manifests existed: the damaged one fails in orbax (one line, not
  # its traceback), the intact one loads unverified. (A damaged array fails too, but then orbax
  # leaves the other arrays' reads pending for good, to fail noisily during some later test.)
  work = _copy(runs, tmp_path)
  for step in ('4', '6'):
    os.remove(work / 'checkpoints' / step / MANIFEST)
  DAMAGES['cut_meta'](work / 'checkpoints' / '6')
  capsys.readouterr()
  err = _resume_and_check(work, runs[0], capsys, start=4)
  [report] = _reports(err)
  assert 'step 6' in report and 'JSONDecodeError' in report, report
  assert any(f'step 4 has no {MANIFEST}' in line for line in err)
  assert _set_aside(work)[0].startswith('6-damaged-')


def test_on_bad_checkpoint_fail_raises_naming_the_step_and_moves_nothing(runs, tmp_path):
  work = _copy(runs, tmp_path)
  DAMAGES['flipped'](work / 'checkpoints' / '6')
  with pytest.raises(CheckpointError, match=r'step 6 .*train\.on_bad_checkpoint=fallback'):
    train(_config(**{'train.on_bad_checkpoint': 'fail'}), str(work), devices=ONE,
          progress=False)
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4', '6']
  assert not os.path.exists(work / 'checkpoints_set_aside')


def test_intact_checkpoint_that_does_not_fit_the_run_is_not_set_aside(runs, tmp_path):
  # Without clipping the optimizer state has another structure: a changed config, not damage.
  work = _copy(runs, tmp_path)
  with pytest.raises(CheckpointError, match=r'step 6 .* exactly as saved.* nothing was set aside'):
    train(_config(**{'train.grad_clip_norm': 0.0}), str(work), devices=ONE, progress=False)
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4', '6']
  assert not os.path.exists(work / 'checkpoints_set_aside')


def test_nonfinite_checkpoint_is_rejected(runs, tmp_path, capsys):
  work = _copy(runs, tmp_path)
  c = _config()
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257,
                                              seq_len=c['data']['seq_len']))
  mesh = parallel.make_mesh(c['mesh'], ONE)
  abstract, shardings = state_shardings(model, make_optimizer(c['train']), mesh,
                                        c['data']['seq_len'])
  ckpt = Checkpointer(str(work), keep=3, async_save=False)
  state, meta = ckpt.restore(6, abstract, shardings)
  ckpt.close()
  # Saved as a run saves (with a valid manifest): only the values are wrong.
  shutil.rmtree(work / 'checkpoints' / '6')
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                               state.params))
  ckpt = Checkpointer(str(work), keep=3, async_save=False)
  ckpt.save(6, poisoned, meta)
  ckpt.close()
  capsys.readouterr()
  err = _resume_and_check(work, runs[0], capsys, start=4)
  [report] = _reports(err)
  assert 'NonFiniteCheckpoint: params' in report, report
  assert _set_aside(work)[0].startswith('6-nonfinite-')


def test_resume_step_picks_an_older_checkpoint_and_sets_newer_ones_aside(runs, tmp_path, capsys):
  work = _copy(runs, tmp_path)
  capsys.readouterr()
  err = _resume_and_check(work, runs[0], capsys, start=2, **{'train.resume_step': 2})
  assert any('train.resume_step=2: moved the newer checkpoints (steps 4, 6)' in line
             for line in err), err
  assert [a.split('-')[:2] for a in _set_aside(work)] == [['4', 'after'], ['6', 'after']]


def test_resume_step_that_does_not_exist_lists_the_steps(runs, tmp_path):
  work = _copy(runs, tmp_path)
  with pytest.raises(CheckpointError, match=r'train\.resume_step=3: .* steps there are 2, 4, 6\.'):
    train(_config(**{'train.resume_step': 3}), str(work), devices=ONE, progress=False)
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '4', '6']


def test_no_usable_checkpoint_starts_from_scratch_and_says_so(runs, tmp_path, capsys):
  work = _copy(runs, tmp_path)
  for step in ('2', '4', '6'):
    DAMAGES['zeroed'](work / 'checkpoints' / step)
  capsys.readouterr()
  err = _resume_and_check(work, runs[0], capsys, start=0)
  assert len(_reports(err)) == 3
  assert 'the run starts from scratch' in _reports(err)[-1]
  assert [a.split('-')[:2] for a in _set_aside(work)] == [['2', 'damaged'], ['4', 'damaged'],
                                                          ['6', 'damaged']]


def test_a_wrapped_tensorstore_error_is_one_line_with_its_cause():
  # What orbax raises for an unreadable array: its own first line names a slice and ends in a
  # multi-line spec; tensorstore's error, the cause, says what is wrong.
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database\nmore')
    except ValueError as inner:
      raise Exception('Encountered error while reading array index: (slice(0, 2, 1),). See full '
                      'TensorStore details: <bound method spec of TensorStore({\n  ...') from inner
  except Exception as e:
    line = checkpoint_module._summary(e)
  assert line == ('Exception: Encountered error while reading array index: (slice(0, 2, 1),). '
                  '(caused by ValueError: OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT '
                  'database)')
