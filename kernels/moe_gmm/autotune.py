"""A per-shape tile autotuner: time a fixed list of tilings once, keep the fastest.

Generic: it knows nothing of the kernels. A caller (ops.py) names the op, gives a key of
static facts (shapes, dtypes, implementation), a candidate list whose first entry is the
default, and `build(candidate)`, which returns a zero-argument thunk that runs the kernel
once on concrete inputs and returns its device output:

  def build(tiling):
    run = jax.jit(functools.partial(triton.gmm, **tiling))
    return lambda: run(lhs, rhs, sizes)

  best = autotune.tune('gmm', (m, k, n, groups, 'bfloat16', 'triton'), CANDIDATES, build)

Jit the kernel inside `build`: an un-jitted thunk is traced again and dispatched op by op on
every call, and its time would be Python's, not the kernel's.

Results are cached per (op, key, device kind, backend, jax version): in this process always,
and in a JSON file shared across runs (`cache_path`), because tuning costs a compile per
candidate and the winner depends on the GPU and the compiler, not on the run.

Safe to call while another function is being traced by `jax.jit`: building and timing run
in a worker thread. JAX's trace state is per thread, so there the candidates' jitted kernels
compile and dispatch exactly as at top level (`jax.ensure_compile_time_eval()` would not do:
under it a jitted call is evaluated eagerly, op by op, which times dispatch and cannot run
interpreted Pallas kernels at all). The thunk must close over concrete arrays (made by
`build` itself, e.g. from the key's shapes), never over the outer trace's tracers; an output
that is a tracer raises TypeError, since timing it would time nothing.
"""

from collections.abc import Callable, Mapping, Sequence
import concurrent.futures
import datetime
import json
import math
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Literal
import warnings

import jax
import numpy as np

try:  # POSIX: serialise read-merge-write among processes sharing one cache file
  import fcntl
except ImportError:  # pragma: no cover - Windows
  fcntl = None

CACHE_FILE_NAME = 'moe_gmm_autotune.json'
_ERROR_CHARS = 200
_ROUNDS = 3

# The full cache key (a JSON string) -> {'best', 'seconds', 'errors', 'when', 'source'}.
_memory: dict[str, dict] = {}
_memory_lock = threading.Lock()
# Paths already warned about as unreadable: one warning per path per process, not per shape.
_warned_paths: set[str] = set()


class _TracerLeak(TypeError):
  """A thunk returned a tracer: the caller's bug, raised rather than skipped as a tiling."""


def clear_memory_cache() -> None:
  """Forgets every in-process result (as a fresh process would); the file is untouched."""
  with _memory_lock:
    _memory.clear()
    _warned_paths.clear()


def last_report(op: str, key: tuple) -> dict | None:
  """What this process knows of (op, key) on the current device, or None if never asked.

  {'best': candidate, 'seconds': {candidate JSON: seconds per call or None if it failed},
   'errors': {candidate JSON: 'Type: message'}, 'when': ISO-8601 UTC time of the tuning,
   'source': 'tuned' (timed in this process) or 'file' (read from the cache file)}.
  """
  with _memory_lock:
    entry = _memory.get(_full_key(op, key))
  return None if entry is None else json.loads(json.dumps(entry))  # a copy the caller may edit


def seconds_per_call(thunk: Callable[[], Any], repeats: int) -> float:
  """Median over 3 rounds of the wall time per call of `repeats` back-to-back calls, seconds.

  Two calls first compile and warm. Within a round the calls are issued without waiting and
  synchronised once at the end: a microsecond kernel timed call by call measures the Python
  dispatch and the host-device round trip, not the kernel, while back to back the device
  queue stays full and dispatch overlaps execution, as in a training step.
  """
  for _ in range(2):
    jax.block_until_ready(thunk())
  rounds = []
  for _ in range(_ROUNDS):
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
      out = thunk()
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / repeats)
  return statistics.median(rounds)


def tune(op: str, key: tuple, candidates: Sequence[Mapping[str, Any]],
         build: Callable[[Mapping[str, Any]], Callable[[], Any]], *,
         repeats: int = 20, cache_path: str | None | Literal['default'] = 'default',
         timer: Callable[[Callable[[], Any], int], float] | None = None) -> dict:
  """The fastest of `candidates` for (op, key) on this device, timed once and then cached.

  Args:
    op: the kernel's name, e.g. 'gmm', 'gmm_transposed', 'tgmm'.
    key: hashable static facts that decide the best tiling (shapes, dtypes, implementation);
      dtypes and other objects are keyed by their str(). The device kind, backend and jax
      version are added here, so a result from another GPU or compiler is never reused.
    candidates: tilings, dicts of ints / bools / strings; the first is the default.
    build: candidate -> zero-argument thunk running the kernel once on concrete inputs and
      returning its output. A candidate whose build, first call or timing raises (too much
      shared memory, a failed compile) is skipped and its error recorded.
    repeats: calls per timing round.
    cache_path: the JSON file shared across runs; 'default' is
      $EFFICIENTJAX_CACHE_DIR/moe_gmm_autotune.json, else
      ~/.cache/efficientjax/moe_gmm_autotune.json; None keeps results in memory only.
    timer: (thunk, repeats) -> seconds per call; `seconds_per_call` by default.

  Returns:
    A copy of the best candidate (the entry of `candidates`, not the file's JSON of it).

  Raises:
    ValueError: no candidates, or repeats < 1.
    RuntimeError: every candidate failed; the message names op, key and each error.
    TypeError: a thunk returned a tracer (it closed over the outer trace's values).
  """
  if not candidates:
    raise ValueError(f'autotune {op}: no candidates')
  if repeats < 1:
    raise ValueError(f'autotune {op}: repeats must be >= 1, got {repeats}')
  names = [_candidate_name(c) for c in candidates]
  full_key = _full_key(op, key)

  with _memory_lock:
    entry = _memory.get(full_key)
  best = _current(entry, candidates, names)
  if best is not None:
    return best

  path = _resolve_path(cache_path)
  if path is not None:
    entry = (_load(path) or {}).get(full_key)
    best = _current(entry, candidates, names)
    if best is not None:
      with _memory_lock:
        _memory[full_key] = {**entry, 'source': 'file'}
      return best

  seconds, errors = _measure(op, candidates, names, build, repeats, timer or seconds_per_call)
  timed = [i for i, name in enumerate(names) if seconds[name] is not None]
  if not timed:
    detail = '; '.join(f'{name}: {errors[name]}' for name in names)
    raise RuntimeError(f'autotune {op}: every candidate failed for key {key!r}: {detail}')
  # min() keeps the earliest of equal times, so a tie goes to the default (the first).
  winner = min(timed, key=lambda i: seconds[names[i]])
  entry = {'best': _jsonable(dict(candidates[winner])), 'seconds': seconds, 'errors': errors,
           'when': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  with _memory_lock:
    _memory[full_key] = {**entry, 'source': 'tuned'}
  if path is not None:
    _write_entry(path, full_key, entry)
  return dict(candidates[winner])


def _measure(op, candidates, names, build, repeats, timer):
  """Times each candidate: ({name: seconds or None}, {name: error of the failed ones})."""
  # A thread of its own: concrete, compiled execution even inside an outer jit trace (see the
  # module docstring). Exceptions come back through result().
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='autotune') as pool:
    return pool.submit(_measure_here, op, candidates, names, build, repeats, timer).result()


def _measure_here(op, candidates, names, build, repeats, timer):
  seconds, errors = {}, {}
  for candidate, name in zip(candidates, names):
    seconds[name] = None
    try:
      thunk = build(candidate)
      # A first call of our own, so a failure to compile or run is caught whatever the timer.
      out = jax.block_until_ready(thunk())
      _refuse_tracers(op, name, out)
      taken = float(timer(thunk, repeats))
      if not math.isfinite(taken) or taken < 0:
        raise ValueError(f'timer returned {taken} seconds')
    except _TracerLeak:
      raise  # the caller's bug, the same for every candidate: skipping would hide it
    except jax.errors.UnexpectedTracerError as error:  # the same bug, met inside the thunk
      raise _TracerLeak(f'autotune {op}: the thunk for {name} used a tracer: it must close '
                        'over concrete arrays, not the values of the function being traced'
                        ) from error
    except Exception as error:  # pylint: disable=broad-except; any failure skips the tiling
      errors[name] = f'{type(error).__name__}: {str(error)[:_ERROR_CHARS]}'
      continue
    seconds[name] = taken
  return seconds, errors


def _refuse_tracers(op: str, name: str, out: Any) -> None:
  # block_until_ready passes a tracer through silently, so the timing would measure tracing.
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(out)):
    raise _TracerLeak(f'autotune {op}: the thunk for {name} returned a tracer: it must '
                      'close over concrete arrays, not the values of the function being traced')


def _current(entry, candidates, names) -> dict | None:
  """The entry's best as the matching current candidate, or None: candidate lists change
  between versions, and a best no longer offered must be tuned again."""
  if not isinstance(entry, Mapping) or not isinstance(entry.get('best'), Mapping):
    return None
  try:
    name = _candidate_name(entry['best'])
  except (TypeError, ValueError):
    return None
  return dict(candidates[names.index(name)]) if name in names else None


def _jsonable(value):
  """Key parts as JSON values: numpy scalars by value, dtypes and other objects by str()."""
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  return str(value)


def _candidate_name(candidate: Mapping[str, Any]) -> str:
  return json.dumps(_jsonable(dict(candidate)), sort_keys=True)


def _full_key(op: str, key: tuple) -> str:
  device = jax.devices()[0]
  return json.dumps([op, _jsonable(key), device.device_kind, jax.default_backend(),
                     jax.__version__])


def _resolve_path(cache_path) -> str | None:
  if cache_path is None:
    return None
  if cache_path == 'default':
    root = os.environ.get('EFFICIENTJAX_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'efficientjax')
    return os.path.join(root, CACHE_FILE_NAME)
  return os.fspath(cache_path)


def _load(path: str) -> dict | None:
  """The file's entries: {} if it is missing, None if it cannot be read or parsed."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (FileNotFoundError, NotADirectoryError):  # no file yet: writing will say if it can't
    return {}
  except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
    _warn_once(path, f'{type(error).__name__}: {error}')
    return None
  if not isinstance(data, dict):
    _warn_once(path, f'the top level is a {type(data).__name__}, not an object')
    return None
  return data


def _warn_once(path: str, why: str) -> None:
  # A cache is an optimisation: warn (once per path, not per shape) and carry on, never stop
  # a training run over one.
  if path not in _warned_paths:
    _warned_paths.add(path)
    warnings.warn(f'autotune: ignoring unreadable cache {path} ({why}); tiles will be tuned '
                  'again')


def _write_entry(path: str, full_key: str, entry: dict) -> None:
  """Adds one entry to the file, atomically, keeping every other entry on disk now."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    with open(path + '.lock', 'a', encoding='utf-8') as lock:
      if fcntl is not None:
        try:
          fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # some network filesystems: the os.replace below is still atomic
          pass
      # Re-read under the lock: other processes may have added entries since we looked.
      data = _load(path)
      if data is None:
        # Moved aside rather than overwritten: a user may still recover entries by hand.
        _move_aside(path)
        data = {}
      data[full_key] = entry
      fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                                 suffix='.tmp')
      try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
          json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
          f.write('\n')
        os.replace(tmp, path)
      except BaseException:
        os.unlink(tmp)
        raise
  except OSError as error:
    warnings.warn(f'autotune: could not write cache {path} ({type(error).__name__}: {error}); '
                  'the result is kept in memory only')


def _move_aside(path: str) -> None:
  try:
    os.replace(path, path + '.corrupt')
  except OSError:
    pass
