"""experiments/sweep.py: studies load and fail early with the field named; a sweep runs every
repeat with its own seed, isolates a failing point, and a killed sweep resumes where it stopped.

The end-to-end tests run real `experiments.main` processes on a 2-step cut of the quick start
(about 5 s each), so each case is paid once: one sweep is killed after its first record and
rerun.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from efficientjax.errors import ConfigError
from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = os.path.join(ROOT, 'configs', 'studies')
_TINY = {'train.steps': 2, 'train.warmup_steps': 0, 'train.eval_every': 0,
         'train.eval_batches': 1, 'train.checkpoint_every': 0, 'train.timing_warmup_steps': 0,
         'train.async_checkpoint': False}


def _study_file(tmp_path, body: dict, name='study.py') -> str:
  path = tmp_path / name
  path.write_text(f'def get_study():\n  return {body!r}\n')
  return str(path)


def _error(tmp_path, body) -> ConfigError:
  with pytest.raises(ConfigError) as e:
    study = sweep.load_study(_study_file(tmp_path, body))
    errors = sweep.check_study(study, num_devices=1)
    if errors:
      raise errors[0]
  return e.value


def test_grid_and_points_expand_to_named_override_sets():
  points = sweep.expand_points({'small': {'model.num_layers': 2}, 'big': {}},
                               {'model.attention': ['mha', 'gqa'], 'model.position': ['rope']})
  assert points == [
      ('small,attention=mha,position=rope',
       {'model.num_layers': 2, 'model.attention': 'mha', 'model.position': 'rope'}),
      ('small,attention=gqa,position=rope',
       {'model.num_layers': 2, 'model.attention': 'gqa', 'model.position': 'rope'}),
      ('big,attention=mha,position=rope', {'model.attention': 'mha', 'model.position': 'rope'}),
      ('big,attention=gqa,position=rope', {'model.attention': 'gqa', 'model.position': 'rope'}),
  ]
  assert sweep.expand_points(None, {'model.position': ['rope', 'none']}) == [
      ('rope', {'model.position': 'rope'}), ('none', {'model.position': 'none'})]


@pytest.mark.parametrize('body,field,words', [
    ({'name': 's', 'base': 'configs/quickstart.py:smoke', 'points': {'a': {}}, 'repeat': 3},
     'repeat', 'unknown study key'),
    ({'name': 's', 'base': 'configs/nope.py', 'points': {'a': {}}}, 'base', 'does not exist'),
    ({'name': 's', 'base': 'configs/quickstart.py:smoke',
      'points': {'a': {'model.attentoin': 'gqa'}}}, 'points.a.model.attentoin',
     "did you mean 'model.attention'"),
    ({'name': 's', 'base': 'configs/quickstart.py:smoke',
      'points': {'a': {'model.sliding_window': None}}}, 'points.a.model.sliding_window',
     'cannot set None'),
    ({'name': 's', 'base': 'configs/quickstart.py:smoke', 'points': {'a b': {}}}, 'points.a b',
     'folder name'),
    ({'name': 's', 'base': 'configs/quickstart.py:smoke', 'points': {'a': {'seed': 3}}},
     'points.a.seed', 'the sweep sets this itself'),
    # Passes the field checks; the run config's own validation names the point and the fix.
    ({'name': 's', 'base': 'configs/quickstart.py:smoke',
      'points': {'ok': {}, 'bad': {'model.attention': 'gqa', 'model.num_kv_heads': 3}}},
     'points.bad.model.num_kv_heads', 'divide'),
    ({'name': 's', 'base': 'configs/quickstart.py:smoke',
      'points': {'a': {'model.num_layers': 'two'}}}, 'points.a.model.num_layers', 'two'),
])
def test_a_bad_study_fails_before_anything_runs_naming_the_field(tmp_path, body, field, words):
  error = _error(tmp_path, body)
  assert error.field == field, error
  assert words in error.message, error


def test_every_committed_study_validates():
  """The studies under configs/studies/ load and every point passes experiments.validate (as
  `--dry_run` checks them), so none of them fails minutes into a sweep."""
  names = sorted(f for f in os.listdir(STUDIES) if f.endswith('.py') and f != '__init__.py')
  assert len(names) >= 5, names
  for name in names:
    study = sweep.load_study(os.path.join(STUDIES, name))
    assert sweep.check_study(study, num_devices=1) == [], name
    assert study.name == name[:-3]


def _sweep_argv(study_file, root, *extra):
  return [sys.executable, '-m', 'experiments.sweep', f'--study={study_file}', f'--root={root}',
          *extra]


def _env():
  env = dict(os.environ)
  # The runs compile little programs: XLA:CPU's cheapest settings (as tests/test_cli.py).
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
  env['PYTHONPATH'] = ROOT
  return env


def _runs_in(root) -> list[int]:
  """Pids of live experiments.main processes whose workdir is under root."""
  pids = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argv = f.read().decode(errors='replace').split('\0')
      with open(f'/proc/{pid}/stat') as f:
        zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
      continue
    if not zombie and 'experiments.main' in argv and any(
        a.startswith(f'--workdir={root}') for a in argv):
      pids.append(int(pid))
  return pids


def _records(folder):
  out = {}
  for dirpath, _, files in os.walk(folder):
    if 'results.jsonl' in files:
      with open(os.path.join(dirpath, 'results.jsonl')) as f:
        out[os.path.relpath(dirpath, folder)] = [json.loads(l) for l in f if l.strip()]
  return out


def test_killed_sweep_resumes_failures_are_isolated_and_repeats_get_their_seeds(tmp_path):
  # 'bad' passes validation and fails at run time (its corpus has no files): exit 2 from
  # experiments.main, after the model was built.
  study_file = _study_file(tmp_path, {
      'name': 'tiny', 'axis': 'attention', 'base': 'configs/quickstart.py:smoke',
      'overrides': _TINY, 'seed': 5, 'repeats': 2,
      'points': {'mha': {}, 'bad': {'data.corpus': f'text:{tmp_path}/none/*.txt'},
                 'gqa': {'model.attention': 'gqa', 'model.num_kv_heads': 2}}})
  root = tmp_path / 'studies'
  folder = root / 'tiny'
  proc = subprocess.Popen(_sweep_argv(study_file, root), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  first = folder / 'mha' / 'seed5' / 'results.jsonl'
  deadline = time.monotonic() + 120
  while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  assert first.exists(), proc.communicate()[0][-3000:]
  while not _runs_in(root / 'tiny' / 'bad') and time.monotonic() < deadline:
    time.sleep(0.05)  # until the sweep has started its next run
  assert _runs_in(root / 'tiny' / 'bad'), 'the next run did not start'
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep only: its runs have sessions of their own
  proc.wait()
  # ... and the run it had started next dies with it (PR_SET_PDEATHSIG), not writing on into
  # a folder the rerun is about to use.
  # (The next run needs ~4 s to fail by itself: an orphan would still be there at 2 s.)
  deadline = time.monotonic() + 2
  while _runs_in(root) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _runs_in(root), 'a run outlived its sweep'
  assert set(_records(folder)) == {'mha/seed5'}
  created = _records(folder)['mha/seed5'][0]['created_at']

  done = subprocess.run(_sweep_argv(study_file, root), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 'bad' failed
  out = done.stdout
  assert '[1/6] mha seed 5: skipped, its record exists' in out, out
  assert 'bad seed 5: FAILED' in out and 'bad seed 6: FAILED' in out, out
  assert '4 of 6 runs have records, 2 failed' in out, out

  records = _records(folder)
  assert sorted(records) == ['gqa/seed5', 'gqa/seed6', 'mha/seed5', 'mha/seed6']
  assert records['mha/seed5'][0]['created_at'] == created  # not run again
  for path, (record,) in records.items():
    point, seed = path.split('/')
    assert record['config']['seed'] == int(seed[4:])
    assert record['config']['study'] == {'name': 'tiny', 'point': point, 'axis': 'attention',
                                         'repeat': int(seed[4:]) - 5}
  # Distinct seeds are distinct runs: different initial weights, so different first losses.
  assert (records['mha/seed5'][0]['quality']['initial_eval_loss'] !=
          records['mha/seed6'][0]['quality']['initial_eval_loss'])
  for seed in (5, 6):
    failed = json.loads((folder / 'bad' / f'seed{seed}' / 'failed.json').read_text())
    assert failed['exit_code'] == 2
    assert 'config or workdir error' in failed['error']
    assert 'data.corpus: no files match' in failed['output_tail']
  attempts = [json.loads(l) for l in (folder / 'sweep.jsonl').read_text().splitlines()]
  assert [a['status'] for a in attempts[-6:]] == ['skipped', 'failed', 'done', 'done', 'failed',
                                                  'done']
  study = json.loads((folder / 'study.json').read_text())
  assert study['seeds'] == [5, 6] and set(study['points']) == {'mha', 'bad', 'gqa'}


def test_a_run_past_its_time_limit_is_killed_and_marked(tmp_path):
  script = tmp_path / 'slow.py'
  script.write_text(textwrap.dedent('''
      import subprocess, sys, time
      subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
      print('started', flush=True)
      time.sleep(60)
  '''))
  start = time.monotonic()
  result = sweep.run_one([sys.executable, str(script)], str(tmp_path / 'run'), timeout_s=2)
  assert time.monotonic() - start < 20
  assert result['status'] == 'failed' and result['error'] == 'timed out after 2 s'
  assert 'started' in result['output_tail']
  assert json.loads((tmp_path / 'run' / 'failed.json').read_text())['error'] == result['error']


def test_a_torn_record_is_not_a_finished_run(tmp_path):
  """A run killed while writing its record leaves a partial line: the rerun must run it."""
  (tmp_path / 'results.jsonl').write_text('{"kind": "pretrain", "con')
  assert not sweep.has_record(str(tmp_path))
  (tmp_path / 'results.jsonl').write_text('{"kind": "pretrain"}\n')
  assert sweep.has_record(str(tmp_path))
  assert not sweep.has_record(str(tmp_path / 'missing'))
