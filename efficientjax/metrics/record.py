"""The result record: one JSON object per run, appended to `<workdir>/results.jsonl`.

Every record goes through `write_record`, so schema changes have one place to happen.
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Mapping
from typing import Any

import jax

SCHEMA_VERSION = 1
RESULTS_FILE = 'results.jsonl'


def config_hash(config: Mapping[str, Any]) -> str:
  """sha256 of the config's canonical JSON: equal configs hash equal across runs and machines."""
  return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str | None:
  """The commit of the efficientjax checkout, with '-dirty' if it has local changes."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '')


def environment(mesh_shape: Mapping[str, int] | None = None) -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'mesh_shape': dict(mesh_shape) if mesh_shape else None,
      'hostname': platform.node(),
      'git_commit': git_commit(),
  }


def new_record(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """The fields every record has, whatever its kind; the runner adds the rest."""
  return {
      'schema_version': SCHEMA_VERSION,
      'run_id': uuid.uuid4().hex,
      'kind': kind,
      'created_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'config': dict(config),
      'config_hash': config_hash(config),
  }


def write_record(workdir: str, record: Mapping[str, Any]) -> str:
  """Appends the record to `<workdir>/results.jsonl` (process 0 only); returns the path."""
  path = os.path.join(workdir, RESULTS_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    line = json.dumps(record, sort_keys=False, allow_nan=False) + '\n'
    with open(path, 'ab') as f:
      # A process killed mid-append leaves a line without its newline: start on a fresh line
      # so the torn one stays the only casualty (read_records(strict=False) skips it).
      if f.tell() and not _ends_with_newline(path):
        line = '\n' + line
      f.write(line.encode())
  return path


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def read_records(path: str, strict: bool = True) -> list[dict[str, Any]]:
  """The records in a results.jsonl; strict=False skips lines that do not parse (a record
  torn by a kill mid-write) instead of raising."""
  out = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        if strict:
          raise
  return out


SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'record_schema.json')


def validate_record(record: Mapping[str, Any]) -> None:
  """Raises jsonschema.ValidationError where `record` breaks the schema (tests use this)."""
  import jsonschema  # pylint: disable=g-import-not-at-top  (a test dependency)
  with open(SCHEMA_PATH) as f:
    schema = json.load(f)
  jsonschema.validate(record, schema, format_checker=jsonschema.FormatChecker())
