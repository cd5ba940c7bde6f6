"""Run a study: every point of a `configs/studies/` file, each repeat in a process of its own.

    python -m experiments.sweep --study=configs/studies/attention_small.py [--root=runs/studies]
        [--points=mha,gqa] [--repeats=N] [--timeout_s=S] [--dry_run]

A study is data (configs/studies/README.md): a base run config, override sets named as study
points (a dict, a grid, or both), a number of repeats and the first seed. Repeat r of a point
runs `experiments.main` with the point's overrides and `seed = seed + r` in
`<root>/<study>/<point>/seed<seed>/`, and its record names the study point (`study.name`,
`study.point`, `study.axis`, `study.repeat`), which is what `experiments.report` groups by.

- Every point's config is built and validated before anything runs: a study with a bad point
  exits 2 naming the point and the field, having run nothing.
- Repeats go round the points (every point's first seed, then every point's second), so a
  sweep stopped early has compared every point once.
- Each run is a process: one that runs out of memory, crashes, exits non-zero or passes
  `--timeout_s` is marked failed (`failed.json` in its folder: exit status, the end of its
  output, the command) and the sweep goes on. The sweep exits 1 if any run failed.
- Rerun the same command to resume: a run whose folder holds a record is skipped; a failed or
  interrupted one runs again (`experiments.main` resumes it from its own checkpoints, if any).
- `init_from`: a run every point starts from (fine-tuning or serving studies): it runs first,
  once, in `<root>/<study>/_init/`, and each point gets `model.init=run:<that folder>`.
- `<root>/<study>/study.json` holds the study as run; `sweep.jsonl` one line per attempt.
"""

import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from efficientjax.errors import ConfigError
from efficientjax.metrics.record import read_records
from experiments import processes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('name', 'description', 'axis', 'base', 'overrides', 'points', 'grid', 'repeats', 'seed',
        'init_from', 'timeout_s')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$')  # folder names, on every file system
INIT = '_init'
RECORD = 'results.jsonl'
FAILED = 'failed.json'

_STUDY = flags.DEFINE_string('study', None, 'the study file, configs/studies/NAME.py')
_ROOT_DIR = flags.DEFINE_string('root', 'runs/studies', 'studies go in ROOT/<study name>/')
_POINTS = flags.DEFINE_list('points', None, 'run only these points (default: all)')
_REPEATS = flags.DEFINE_integer('repeats', None, "override the study's number of repeats")
_TIMEOUT = flags.DEFINE_float('timeout_s', None, "a run's wall-time limit, seconds (default: "
                              "the study's timeout_s, else none)")
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'validate and print the commands; run nothing')


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: dict[str, Any]  # dotted config path -> value, the study's common ones included


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  axis: str
  base: str  # a run config, FILE.py[:PRESET], as experiments.main takes it
  points: tuple[Point, ...]
  repeats: int
  seed: int
  init_from: Point | None  # its overrides apply to init_from's own base
  init_base: str | None
  timeout_s: float | None
  description: str = ''
  path: str = ''

  def seeds(self) -> list[int]:
    return [self.seed + r for r in range(self.repeats)]

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'description': self.description, 'axis': self.axis,
            'base': self.base, 'repeats': self.repeats, 'seeds': self.seeds(),
            'points': {p.name: p.overrides for p in self.points}, 'timeout_s': self.timeout_s,
            'init_from': (None if self.init_from is None else
                          {'base': self.init_base, 'overrides': self.init_from.overrides}),
            'study_file': self.path}


class StudyError(ConfigError):
  """A study file the sweep cannot run; `field` names the key (e.g. points.gqa.model.attention)."""


def _resolve_config_path(spec: str, field: str) -> str:
  """FILE.py[:PRESET] with FILE found relative to the working directory or the project."""
  path, sep, preset = spec.partition(':')
  for candidate in (path, os.path.join(_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate) + sep + preset
  raise StudyError(field, f'{path} does not exist; name a run config such as '
                   'configs/quickstart.py[:smoke]')


def _point_name(assignment: Mapping[str, Any]) -> str:
  """A grid point's name from its values: 'gqa', or 'attention=gqa,position=alibi'."""
  if len(assignment) == 1:
    return str(next(iter(assignment.values())))
  return ','.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in assignment.items())


def _check_overrides(overrides: Any, field: str) -> dict[str, Any]:
  from experiments.validate import schema_paths, unknown_field_error  # pylint: disable=g-import-not-at-top
  if not isinstance(overrides, Mapping):
    raise StudyError(field, f'must be a dict of config paths to values, got {overrides!r}')
  known = schema_paths()
  for path, value in overrides.items():
    if path not in known:
      raise StudyError(f'{field}.{path}', unknown_field_error(path).message)
    if path.startswith('study.') or path == 'seed':
      raise StudyError(f'{field}.{path}', 'the sweep sets this itself (seed: the study\'s '
                       '`seed` plus the repeat); remove it')
    if value is None or not isinstance(value, (bool, int, float, str)):
      raise StudyError(f'{field}.{path}', f'{value!r}: a value must be a bool, number or string '
                       '(the command line cannot set None: leave the field out to keep the '
                       "base config's value)")
  return dict(overrides)


def expand_points(points: Any, grid: Any) -> list[tuple[str, dict[str, Any]]]:
  """(name, overrides) of every point: each named set in `points` crossed with every
  combination of `grid`'s values (a grid alone names its points by their values)."""
  if points is None and grid is None:
    raise StudyError('points', 'a study needs `points` (name -> overrides) or a `grid` '
                     '(config path -> list of values), or both')
  if points is not None and (not isinstance(points, Mapping) or not points):
    raise StudyError('points', f'must be a non-empty dict of name -> overrides, got {points!r}')
  named = list((points or {'': {}}).items())
  combos = [{}]
  if grid is not None:
    if not isinstance(grid, Mapping) or not grid or not all(
        isinstance(v, (list, tuple)) and v for v in grid.values()):
      raise StudyError('grid', f'must map config paths to non-empty lists of values, got {grid!r}')
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid.values())]
  out = []
  for (name, overrides), combo in itertools.product(named, combos):
    parts = [p for p in (str(name), _point_name(combo) if combo else '') if p]
    out.append((','.join(parts), {**(overrides or {}), **combo}))
  names = [n for n, _ in out]
  for n in names:
    if not _NAME.match(n):
      raise StudyError(f'points.{n}', 'a point name is a folder name: letters, digits and '
                       "_ . = , + - only; rename it")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise StudyError('points', f'names {duplicates} occur more than once')
  return out


def load_study(path: str) -> Study:
  """The study in `path` (a file defining `get_study()` -> dict), checked key by key."""
  if not os.path.isfile(path):
    raise StudyError('--study', f'{path} does not exist; studies are under configs/studies/')
  spec = importlib.util.spec_from_file_location('_study', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_study'):
    raise StudyError('--study', f'{path} defines no get_study(); see configs/studies/README.md')
  s = module.get_study()
  unknown = sorted(set(s) - set(KEYS))
  if unknown:
    raise StudyError(unknown[0], f'unknown study key; the keys are {", ".join(KEYS)}')
  for key in ('name', 'base'):
    if not isinstance(s.get(key), str) or not s[key]:
      raise StudyError(key, 'required: a non-empty string')
  if not _NAME.match(s['name']):
    raise StudyError('name', f'{s["name"]!r} is a folder name: letters, digits, _ . = , + - only')
  repeats, seed = s.get('repeats', 1), s.get('seed', 0)
  if not isinstance(repeats, int) or repeats < 1:
    raise StudyError('repeats', f'must be an integer >= 1, got {repeats!r}')
  if not isinstance(seed, int) or seed < 0:
    raise StudyError('seed', f'must be an integer >= 0, got {seed!r}')
  common = _check_overrides(s.get('overrides', {}), 'overrides')
  points = []
  for name, overrides in expand_points(s.get('points'), s.get('grid')):
    points.append(Point(name, {**common, **_check_overrides(overrides, f'points.{name}')}))
  init, init_base = None, None
  if s.get('init_from') is not None:
    spec_ = s['init_from']
    if not isinstance(spec_, Mapping) or set(spec_) - {'base', 'overrides'} or 'base' not in spec_:
      raise StudyError('init_from', "must be {'base': CONFIG[:PRESET], 'overrides': {...}}")
    init_base = _resolve_config_path(spec_['base'], 'init_from.base')
    init = Point(INIT, _check_overrides(spec_.get('overrides', {}), 'init_from.overrides'))
    for p in points:
      if 'model.init' in p.overrides:
        raise StudyError(f'points.{p.name}.model.init', 'init_from sets model.init for every '
                         'point; remove one of the two')
  timeout = s.get('timeout_s')
  if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
    raise StudyError('timeout_s', f'must be a positive number of seconds, got {timeout!r}')
  return Study(name=s['name'], axis=s.get('axis') or s['name'],
               base=_resolve_config_path(s['base'], 'base'), points=tuple(points),
               repeats=repeats, seed=seed, init_from=init, init_base=init_base,
               timeout_s=timeout, description=s.get('description', ''),
               path=os.path.abspath(path))


def build_config(base: str, overrides: Mapping[str, Any]):
  """The ConfigDict experiments.main would build from --config=base and the overrides."""
  path, _, preset = base.partition(':')
  spec = importlib.util.spec_from_file_location('_run_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  for dotted, value in overrides.items():
    *parents, key = dotted.split('.')
    node = config
    for p in parents:
      node = node[p]
    try:
      node[key] = value
    except (TypeError, ValueError) as e:
      raise StudyError(dotted, f'{value!r}: {e}') from e
  return config


def _flag_value(value: Any) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def run_overrides(study: Study, point: Point, repeat: int, init_dir: str | None) -> dict:
  """Everything a run of `point` sets on experiments.main's command line."""
  out = dict(point.overrides)
  # init_from's run is named too (point '_init'): reports leave such set-up runs out.
  out.update({'study.name': study.name, 'study.point': point.name, 'study.axis': study.axis,
              'study.repeat': repeat})
  if point is not study.init_from and init_dir is not None:
    out['model.init'] = f'run:{init_dir}'
  out['seed'] = study.seed + repeat
  return out


def command(base: str, overrides: Mapping[str, Any], workdir: str) -> list[str]:
  return ([sys.executable, '-m', 'experiments.main', f'--config={base}'] +
          [f'--config.{k}={_flag_value(v)}' for k, v in overrides.items()] +
          [f'--workdir={workdir}'])


def _within(prefix: str, error: ConfigError) -> StudyError:
  return StudyError(f'{prefix}.{error.field}', error.message)


def check_study(study: Study, **facts: Any) -> list[ConfigError]:
  """Each point's config through experiments.validate, as experiments.main would check it (with
  init_from, a point's architecture is init_from's: the run it starts from fixes it). `facts`:
  validate.check's device facts (default: this machine's)."""
  from experiments import validate  # pylint: disable=g-import-not-at-top
  errors = []
  init_model = None
  if study.init_from is not None:
    init_config = build_config(study.init_base, run_overrides(study, study.init_from, 0, None))
    errors += [_within('init_from', e) for e in validate.check_run(init_config, **facts)]
    init_model = init_config.model
  for point in study.points:
    try:
      config = build_config(study.base, run_overrides(study, point, 0, None))
    except StudyError as e:
      errors.append(_within(f'points.{point.name}', e))
      continue
    if init_model is not None:
      explicit = {k.split('.', 1)[1] for k in point.overrides if k.startswith('model.')}
      for key in init_model:
        if key != 'init' and key not in explicit:
          config.model[key] = init_model[key]
    errors += [_within(f'points.{point.name}', e) for e in validate.check_run(config, **facts)]
  return errors


def has_record(workdir: str) -> bool:
  """Whether the run in workdir wrote its record (a line torn by a kill does not count)."""
  try:
    return bool(read_records(os.path.join(workdir, RECORD), strict=False))
  except OSError:
    return False


def _tail(text: str, lines: int = 25) -> str:
  return '\n'.join(text.strip().splitlines()[-lines:])


def _why(code: int | None, timed_out: bool, timeout_s: float | None) -> str:
  if timed_out:
    return f'timed out after {timeout_s:g} s'
  if code is not None and code < 0:
    name = signal.Signals(-code).name
    return f'killed by {name}' + (' (out of memory?)' if -code == signal.SIGKILL else '')
  return {1: 'the run stopped (exit 1)', 2: 'config or workdir error (exit 2)'}.get(
      code, f'exit status {code}')


def run_one(argv: list[str], workdir: str, timeout_s: float | None,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Run one point's repeat in its own process group; its output goes to
  <workdir>/sweep_run.log. Interrupting the sweep (Ctrl-C, SIGTERM) stops the run too."""
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(os.path.join(workdir, FAILED)):
    os.remove(os.path.join(workdir, FAILED))
  start = time.monotonic()
  log_path = os.path.join(workdir, 'sweep_run.log')
  timed_out = False
  with open(log_path, 'w') as log:
    # Its own process group, dying with the sweep: no run outlives a stopped sweep and writes
    # on in a folder its rerun resumes.
    proc = processes.start_group(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env=None if env is None else dict(env))
    try:
      code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, signal.SIGKILL)
      code = proc.wait()
    except BaseException:  # KeyboardInterrupt (SIGINT, or SIGTERM: main): the run stops too
      processes.stop_group(proc)
      raise
  seconds = time.monotonic() - start
  if code == 0 and has_record(workdir):
    return {'status': 'done', 'seconds': seconds}
  with open(log_path, errors='replace') as f:
    output = f.read()
  failure = {'status': 'failed', 'seconds': seconds, 'exit_code': code,
             'error': _why(code, timed_out, timeout_s), 'output_tail': _tail(output),
             'command': argv}
  with open(os.path.join(workdir, FAILED), 'w') as f:
    json.dump(failure, f, indent=1)
  return failure


def _summary(workdir: str) -> str:
  """The record's quality and speed, for the progress line."""
  record = read_records(os.path.join(workdir, RECORD), strict=False)[-1]
  q, m = record.get('quality') or {}, record.get('metrics') or {}
  parts = []
  if isinstance(q.get('eval_loss'), (int, float)):
    parts.append(f'eval loss {q["eval_loss"]:.4g}')
  throughput = m.get('throughput') or {}
  for key, unit in (('tokens_per_s', 'tok/s'), ('output_tokens_per_s', 'output tok/s')):
    if isinstance(throughput.get(key), (int, float)):
      parts.append(f'{throughput[key]:,.0f} {unit}')
  return ', '.join(parts)


def _clock(seconds: float) -> str:
  return f'{int(seconds // 60)}:{int(seconds % 60):02d}'


def sweep(study: Study, root: str, *, points: Sequence[str] | None = None,
          timeout_s: float | None = None, dry_run: bool = False, out=sys.stdout,
          env: Mapping[str, str] | None = None) -> int:
  """Run (or resume) the study under root/<name>; returns the exit status (0: every run has a
  record, 1: some failed)."""
  chosen = [p for p in study.points if points is None or p.name in points]
  if points is not None:
    missing = sorted(set(points) - {p.name for p in study.points})
    if missing:
      raise StudyError('--points', f'{missing} are not points of {study.name}; its points: '
                       f'{", ".join(p.name for p in study.points)}')
  folder = os.path.abspath(os.path.join(root, study.name))
  init_dir = os.path.join(folder, INIT) if study.init_from is not None else None
  runs = [(p, r) for r in range(study.repeats) for p in chosen]  # repeats go round the points
  if init_dir is not None:
    runs.insert(0, (study.init_from, 0))
  timeout_s = timeout_s or study.timeout_s

  def workdir(point, repeat):
    if point is study.init_from:
      return init_dir
    return os.path.join(folder, point.name, f'seed{study.seed + repeat}')

  if dry_run:
    for point, repeat in runs:
      base = study.init_base if point is study.init_from else study.base
      print(' '.join(command(base, run_overrides(study, point, repeat, init_dir),
                             workdir(point, repeat))), file=out)
    return 0
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'study.json'), 'w') as f:
    json.dump({**study.to_json(), 'written_at': _now()}, f, indent=1)
  failed, started = 0, time.monotonic()
  ran_seconds, ran = 0.0, 0
  for i, (point, repeat) in enumerate(runs, 1):
    wd = workdir(point, repeat)
    label = f'[{i}/{len(runs)}] {point.name} seed {study.seed + repeat}'
    if has_record(wd):
      entry = {'status': 'skipped', 'reason': 'its record exists'}
      print(f'{label}: skipped, its record exists', file=out, flush=True)
    elif point is not study.init_from and init_dir is not None and not has_record(init_dir):
      entry = {'status': 'failed', 'error': 'init_from did not finish; see _init/failed.json'}
      failed += 1
      print(f'{label}: not run, init_from failed', file=out, flush=True)
    else:
      base = study.init_base if point is study.init_from else study.base
      argv = command(base, run_overrides(study, point, repeat, init_dir), wd)
      entry = run_one(argv, wd, timeout_s, env)
      ran_seconds, ran = ran_seconds + entry['seconds'], ran + 1
      left = sum(1 for p, r in runs[i:] if not has_record(workdir(p, r)))
      eta = f'; about {_clock(ran_seconds / ran * left)} left' if left else ''
      if entry['status'] == 'done':
        print(f'{label}: done in {entry["seconds"]:.0f} s ({_summary(wd)}){eta}', file=out,
              flush=True)
      else:
        failed += 1
        print(f'{label}: FAILED in {entry["seconds"]:.0f} s: {entry["error"]}; '
              f'{os.path.join(wd, FAILED)}{eta}', file=out, flush=True)
    with open(os.path.join(folder, 'sweep.jsonl'), 'a') as f:
      f.write(json.dumps({'at': _now(), 'point': point.name, 'repeat': repeat,
                          'seed': study.seed + repeat, 'workdir': wd, **entry}) + '\n')
  print(f'{study.name}: {len(runs) - failed} of {len(runs)} runs have records, {failed} failed '
        f'({_clock(time.monotonic() - started)}); report: python -m experiments.report {folder}',
        file=out, flush=True)
  return 1 if failed else 0


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'unexpected arguments {argv[1:]}')
  if not _STUDY.value:
    sys.exit('usage: python -m experiments.sweep --study=configs/studies/NAME.py')
  # The validation below asks JAX for the device count; on a GPU that must not take the
  # memory (75% of it, by default) the runs need. The runs get the environment as it was.
  run_env = dict(os.environ)
  os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  try:
    study = load_study(_STUDY.value)
    if _REPEATS.value is not None:
      if _REPEATS.value < 1:
        raise StudyError('--repeats', f'must be >= 1, got {_REPEATS.value}')
      study = dataclasses.replace(study, repeats=_REPEATS.value)
    errors = check_study(study)
  except ConfigError as e:
    errors = [e]
  if errors:
    sys.stderr.write(''.join(f'study error: {e.field}: {e.message}\n' for e in errors))
    sys.exit(2)
  signal.signal(signal.SIGTERM, _interrupt)  # a batch system's stop: as Ctrl-C
  try:
    code = sweep(study, _ROOT_DIR.value, points=_POINTS.value, timeout_s=_TIMEOUT.value,
                 dry_run=_DRY_RUN.value, env=run_env)
  except ConfigError as e:
    sys.stderr.write(f'study error: {e.field}: {e.message}\n')
    sys.exit(2)
  except KeyboardInterrupt:
    sys.stderr.write('sweep stopped, and the run it had started; rerun the same command to '
                     'resume\n')
    sys.exit(130)
  sys.exit(code)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


if __name__ == '__main__':
  app.run(main)
