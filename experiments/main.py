"""The one command: train, fine-tune or serve a model and write its result record.

    python -m experiments.main --config=configs/quickstart.py[:PRESET] [--config.a.b=VALUE ...]
                               [--workdir=DIR]

A config (or --workdir) the run cannot use exits with status 2 and a message naming the field
and the fix, before anything is built; a diverged run exits with status 1 and says which
checkpoint is good. `--help` lists the config files and their presets.
"""

import ast
import datetime
import json
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from efficientjax.errors import ConfigError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = os.path.join(_ROOT, 'configs')
DEFAULT_CONFIG = os.path.join(_CONFIGS, 'quickstart.py')
_CONFIG_FLAG = '--config.'
_HELP_FLAGS = ('-h', '-?', '-help', '--help', '--helpfull', '--helpshort')
USAGE = ('usage: python -m experiments.main --config=configs/FILE.py[:PRESET] '
         '[--config.FIELD=VALUE ...] [--workdir=DIR]')


def config_files() -> list[tuple[str, str, tuple[str, ...]]]:
  """(path, one-line description, presets) of each run config under configs/, read from the
  source (its docstring's first line, its `PRESETS`) without running it."""
  out = []
  for name in sorted(os.listdir(_CONFIGS)):
    if not name.endswith('.py') or name in ('base.py', '__init__.py'):
      continue
    with open(os.path.join(_CONFIGS, name), encoding='utf-8') as f:
      module = ast.parse(f.read())
    doc = (ast.get_docstring(module) or '').strip()
    presets = ()
    for node in module.body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1 and
          isinstance(node.targets[0], ast.Name) and node.targets[0].id == 'PRESETS'):
        presets = tuple(ast.literal_eval(node.value))
    out.append((f'configs/{name}', doc.splitlines()[0] if doc else '', presets))
  return out


def help_text() -> str:
  """What --help prints: the usage, every config file with its presets, the flags."""
  lines = [USAGE, '', 'Trains a model with an efficiency technique and writes its result record.',
           '', 'configs (no :PRESET is the full-size run; :smoke runs on a laptop CPU in seconds):']
  for path, description, presets in config_files():
    lines.append(f'  {path}' + (f'[:{"|:".join(presets)}]' if presets else ''))
    lines.append(f'      {description}')
  lines += ['', 'flags:',
            '  --config=FILE[:PRESET]   the run config (default: configs/quickstart.py)',
            '  --config.FIELD=VALUE     override one field, e.g. --config.model.num_layers=8;',
            '                           every field and its default: configs/base.py',
            '  --workdir=DIR            where the run writes (default: runs/<config>-<UTC time>);',
            '                           a workdir holding checkpoints resumes from the latest',
            '  -h, --help, --helpfull   this message',
            '',
            'exit status: 0 done; 1 the run stopped (e.g. a non-finite loss); 2 a config or '
            '--workdir error']
  return '\n'.join(lines) + '\n'


def fail(errors: list[ConfigError]) -> None:
  lines = [f'config error: {e.field}: {e.message}' for e in errors]
  sys.stderr.write('\n'.join(lines) + '\n')
  sys.exit(2)


def _check_override_paths(argv: list[str]) -> None:
  """Unknown `--config.x.y=` fields fail here with a suggestion (config_flags would raise one
  deep inside flag definition, as a traceback)."""
  from experiments.validate import schema_paths, unknown_field_error  # pylint: disable=g-import-not-at-top
  known = schema_paths()
  errors = []
  for arg in argv[1:]:
    if arg.startswith(_CONFIG_FLAG):
      path = arg[len(_CONFIG_FLAG):].split('=', 1)[0]
      if path not in known and not any(k.startswith(path + '.') for k in known):
        errors.append(unknown_field_error(path))
  if errors:
    fail(errors)


def _flag_error(e: Exception) -> ConfigError:
  """A config-file or override failure, as one line: the last line of a chained traceback is
  the config file's own message (e.g. an unknown preset)."""
  text = str(e).strip()
  if text.startswith('flag --config.'):  # e.g. "flag --config.model.num_layers=abc: invalid ..."
    flag, _, why = text[len('flag --config.'):].partition(': ')
    return ConfigError(flag.split('=')[0], f'{why} (from --config.{flag})')
  last = text.splitlines()[-1] if text else type(e).__name__
  return ConfigError('--config', f'{last.strip()}; check the file path and its :preset')


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail([_flag_error(e)])


def _config_arg(argv: list[str]) -> str:
  """The --config value in argv ('configs/quickstart.py:smoke'), or the default's."""
  arg = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      arg = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      arg = argv[i + 1]
  return arg


def _config_name(argv: list[str]) -> str:
  """'quickstart_smoke' for --config=configs/quickstart.py:smoke: names the default workdir."""
  path, _, preset = _config_arg(argv).partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return f'{name}_{preset}' if preset else name


def _explicit_model_fields(argv: list[str]) -> set[str]:
  """The `model` fields set on the command line ('num_layers', 'moe.top_k')."""
  prefix = _CONFIG_FLAG + 'model.'
  return {a[len(prefix):].split('=', 1)[0] for a in argv[1:] if a.startswith(prefix)}


def _resolved_before(workdir: str, spec: str) -> dict | None:
  """The `model` section a run in `workdir` already resolved from the same weight source (a
  restart), or None: a restart resumes from its own checkpoints and never reads the source
  again (it may have moved, or saved newer steps)."""
  from efficientjax.train import init_from  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      model = json.load(f)['model']
    kind, path, step = init_from.parse(spec)
    theirs = init_from.parse(model['init'])
  except (OSError, ValueError, KeyError, TypeError, ConfigError):
    return None
  same = theirs[:2] == (kind, path) and step in (None, theirs[2])
  has_checkpoints = os.path.isdir(os.path.join(workdir, 'checkpoints'))
  return model if same and has_checkpoints else None


def _resolve_init(config, workdir: str) -> None:
  """With model.init set, the architecture comes from the weight source: its fields are set in
  `config` (a command-line value contradicting the source exits 2), before anything is checked
  or built. Reads the source's config only, never its weights; a restart takes what its first
  start resolved."""
  if not config.model.init:
    return
  from configs import base  # pylint: disable=g-import-not-at-top
  from efficientjax.train import init_from  # pylint: disable=g-import-not-at-top
  model = _resolved_before(workdir, config.model.init)
  if model is None:
    try:
      model, source, replaced = init_from.resolve(
          config.model.to_dict(), config.data.to_dict(), base.get_config().model.to_dict(),
          _explicit_model_fields(sys.argv))
    except ConfigError as e:
      fail([e])
    what = f'{source.family} checkpoint' if source.kind == 'hf' else f'run, step {source.step}'
    sys.stderr.write(f'model.init: weights and architecture from {source.path} ({what})'
                     + (f'; set from it: {", ".join(replaced)}' if replaced else '') + '\n')
  for path, value in init_from.leaves(model).items():
    *parents, key = path.split('.')
    node = config.model
    for p in parents:
      node = node[p]
    if node[key] != value:
      node[key] = value


def _remove_if_only_config(workdir: str, new: bool) -> None:
  """A run stopped before it began leaves no workdir behind that it created (its config.json
  alone); anything else there stays."""
  import jax  # pylint: disable=g-import-not-at-top
  if not new or jax.process_index() != 0:
    return
  try:
    if os.listdir(workdir) == ['config.json']:
      os.remove(os.path.join(workdir, 'config.json'))
      os.rmdir(workdir)
  except OSError:
    pass


def _presets(argv: list[str]) -> str:
  """'configs/mla_7b.py:smoke, configs/mla_7b.py:1gpu' for the config named in argv."""
  path = os.path.abspath(_config_arg(argv).partition(':')[0])
  for file, _, presets in config_files():
    if os.path.join(_ROOT, file) == path:
      return ', '.join(f'{file}:{p}' for p in presets)
  return ''


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail([ConfigError('argv', f'unexpected arguments {argv[1:]}; settings go in '
                      '--config.FIELD=VALUE')])
  try:
    config = flags.FLAGS.config
    config.keys()  # a file that failed to load raises only when first read
  except Exception as e:  # pylint: disable=broad-except
    fail([_flag_error(e)])
  import jax  # pylint: disable=g-import-not-at-top
  from efficientjax import parallel  # pylint: disable=g-import-not-at-top
  from experiments import validate  # pylint: disable=g-import-not-at-top
  from experiments.registry import runner  # pylint: disable=g-import-not-at-top
  # Before anything asks JAX for devices: the checks below need the global device count.
  distributed = parallel.maybe_initialize_distributed()
  if distributed and not flags.FLAGS.workdir:
    fail([ConfigError('--workdir', 'a multi-process run needs one --workdir, the same in every '
                      'process and on a file system they all see (each would name its own '
                      'default from its own clock)')])
  workdir = flags.FLAGS.workdir or os.path.join(
      'runs', f'{_config_name(sys.argv)}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}')
  _resolve_init(config, workdir)
  errors = validate.check_run(config, workdir)
  if errors:
    fail(errors)

  from efficientjax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from efficientjax.train.fit import DoesNotFit  # pylint: disable=g-import-not-at-top
  from efficientjax.train.loop import TrainingDiverged  # pylint: disable=g-import-not-at-top
  new_workdir = not os.path.exists(workdir)
  try:
    record_path = runner(config.kind)(config, workdir)
  except DoesNotFit as e:
    _remove_if_only_config(workdir, new_workdir)
    presets = _presets(sys.argv)
    if presets:
      e.message += f'\nPresets of this config: {presets}.'
    fail([e])
  except ConfigError as e:
    fail([e])
  except TrainingDiverged as e:
    sys.stderr.write(f'training stopped: {e}\n')
    sys.exit(1)
  except CheckpointError as e:  # a checkpoint the run cannot use (train.on_bad_checkpoint=fail)
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  except Exception:  # pylint: disable=broad-except
    if not distributed:
      raise
    # Not into jax's exit-time shutdown barrier: a peer that died (the usual cause here: a
    # collective failed) never reaches it, and the barrier waits out the heartbeat timeout
    # (EFFICIENTJAX_HEARTBEAT_TIMEOUT_S, 100 s). Exiting now fails the peers' next collective,
    # or their coordinator.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  if jax.process_index() == 0:  # one line for the job, not one per process
    print(f'result record: {record_path}')


def run() -> None:
  # absl's own --help exits with status 1 and cannot list the config files.
  if any(a in _HELP_FLAGS or a.startswith('--help') for a in sys.argv[1:]):
    sys.stdout.write(help_text())
    sys.exit(0)
  _check_override_paths(sys.argv)
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Run config: a file path with an '
                                    'optional :preset.', lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    fail([_flag_error(e)])
  flags.DEFINE_string('workdir', None, 'Run directory (default runs/<config>-<UTC time>); a '
                      'directory that holds checkpoints resumes from the latest.')
  logging.set_verbosity(logging.WARNING)
  app.run(_main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
