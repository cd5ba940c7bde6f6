"""Orbax checkpoints of the train state plus the data position and run metadata, verified on
restore; a damaged one is set aside and the run goes on from an older one.

Integrity. Every checkpoint carries `integrity.json`: the size and CRC-32 of each of its files.
It is written from orbax's post-finalisation callback, after the items are complete and before
orbax commits the step by renaming `<step>.orbax-checkpoint-tmp` to `<step>`, so every committed
checkpoint has one and a SIGKILL at any moment leaves either both or neither. A restore checks
sizes, then CRCs, before orbax reads a byte, then that every floating value is finite. A
checkpoint without a manifest (saved before there were any) still loads, unverified, with a note.
Many processes: each writes its own shards (orbax), process 0 the manifest once all are written
(orbax's commit barrier comes first); on restore each CRCs its share of the files and all take
the same verdict, so every process sets aside, or goes on from, the same checkpoint.

What is bad, and what is not. A file that differs from its manifest, a checkpoint without one
that orbax cannot read, or NaN/inf in the state: reported in one paragraph on stderr and, with
train.on_bad_checkpoint='fallback', moved to `<workdir>/checkpoints_set_aside/` and the next
older checkpoint tried (from scratch when none is left); with 'fail', CheckpointError and nothing
moved. Files that match their manifest yet do not restore are not damage (the config or code
changed, or the error is transient): CheckpointError, never set aside, whatever the setting.

Why a manifest and not the storage stack's own checks (orbax 0.12.8, tensorstore 0.1.86; tried by
flipping 64 bytes in the middle of the largest data file of a saved checkpoint):
- OCDBT CRC-32C-checks its manifest, B+tree and version-tree nodes
  (`internal_ocdbt::DecodeWithOptionalCompression`), but array values in its data files are
  byte ranges read back raw (`IndirectDataKvStoreDriver::Read`): nothing checks them.
- orbax writes zarr2 chunks with zstd level 1 and no frame checksum (tensorstore's
  `ZstdCompressor` leaves riegeli's `store_checksum` off); zstd stores random-looking float
  bytes as raw blocks, so flipped bytes decode "fine". Measured: loads silently, wrong values.
- orbax's `use_zarr3=True` puts `crc32c` only on the shard *index* (`index_codecs`), not on the
  chunk codecs. Measured: loads silently, wrong values.
- tensorstore's zarr3 `crc32c` chunk codec (or zstd `checksum: true`) does catch it ("DATA_LOSS
  ... Digest mismatch"), but orbax builds its codec chain in a private function
  (`tensorstore_utils._build_zarr3_metadata`) with no option to add one; patching it would tie
  this project (orbax-checkpoint>=0.11) to one orbax's internals, and would still leave the meta
  JSON unchecked, where one changed digit silently moves the data position.
Truncated, zeroed or overwritten files do fail inside tensorstore on their own, with a message
that names no step; the manifest reports them before any of that.

Cost, measured with `python -m experiments.bench_checkpoint --repeats=7` (a real train state,
params + AdamW moments in float32, saved synchronously and restored 7 times, medians; the
project's 2-core CPU machine; files read from the page cache;
experiments/results/cpu/bench_checkpoint.json). Save and restore are the whole calls, the
checks included:

  state                      checkpoint  save    manifest        restore  verify + finite
  quickstart (1.15M params)  12.8 MB     0.112 s 0.012 s (10%)   0.068 s  0.012 + 0.003 s (21%)
  ~100 MB params (25.6M)     284 MB      0.946 s 0.090 s (9.5%)  0.454 s  0.088 + 0.059 s (32%)

The manifest runs on orbax's finalising thread, so an async save's training steps do not wait
for it (it delays the commit and takes a core meanwhile). CRC-32 (zlib, ~2 GB/s a core here;
sha256 ran at ~1 GB/s) is for corruption, not tampering. A restore from cold storage reads each
file twice (to verify, then in tensorstore): up to one more read of the checkpoint per restart.
"""

import glob
import json
import os
import sys
import time
import zlib
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from efficientjax.train.state import TrainState

MANIFEST = 'integrity.json'
# Written by orbax at the commit, after the manifest: not covered by it.
_COMMIT_FILES = frozenset({'_CHECKPOINT_METADATA', 'commit_success.txt'})
# orbax's name for a step being written (atomicity_types.TMP_DIR_SUFFIX); older versions add a
# timestamp after it.
_TMP_SUFFIX = '.orbax-checkpoint-tmp'
_READ_BYTES = 8 << 20
_PROBLEM_BYTES = 1024  # of a CorruptCheckpoint message, as processes tell each other


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used where the config says not to go on without it, or a
  train.resume_step that names no checkpoint. `experiments.main` prints it and exits 1."""


class CorruptCheckpoint(CheckpointError):
  """A file of a checkpoint is missing or differs from what was saved."""


class NonFiniteCheckpoint(CheckpointError):
  """A checkpoint holds NaN or infinite parameters or optimizer state."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint whose files verify but do not restore into this run's state: not damage (a
  changed config or code, or a transient error), so it is never set aside."""


def _stored(state: TrainState) -> dict[str, Any]:
  """The state as saved: a dict, with `model_state` only when the model has one, so a dense
  model's checkpoints keep the layout they had before model state existed (and old ones load)."""
  fields = {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
            'rng': state.rng}
  if state.model_state:
    fields['model_state'] = state.model_state
  return fields


def _crc32(path: str) -> int:
  crc, buf = 0, bytearray(_READ_BYTES)
  view = memoryview(buf)
  with open(path, 'rb', buffering=0) as f:
    while n := f.readinto(buf):
      crc = zlib.crc32(view[:n], crc)  # releases the GIL: files hash in parallel threads
  return crc


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel != MANIFEST and rel not in _COMMIT_FILES:
        out.append(rel)
  return sorted(out)


def _parallel_crc32(directory: str, rels: list[str]) -> dict[str, int]:
  # Largest first so one big file does not start last.
  rels = sorted(rels, key=lambda r: -os.path.getsize(os.path.join(directory, r)))
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(rels, pool.map(lambda r: _crc32(os.path.join(directory, r)), rels)))


def write_manifest(directory: str) -> None:
  """Records the size and CRC-32 of every file under a checkpoint's directory."""
  rels = _files(directory)
  crcs = _parallel_crc32(directory, rels)
  manifest = {'format': 1, 'algorithm': 'crc32',
              'files': {r: {'bytes': os.path.getsize(os.path.join(directory, r)),
                            'crc32': f'{crcs[r]:08x}'} for r in rels}}
  tmp = os.path.join(directory, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MANIFEST))


def verify_manifest(directory: str, *, share: tuple[int, int] = (0, 1)) -> bool:
  """Checks a checkpoint's files against its manifest; False when it has none (saved before
  manifests existed). Raises CorruptCheckpoint naming the first file that differs.

  share=(i, n): read (CRC) only the i-th of n equal-byte shares of the files; sizes are checked
  for all of them (a stat each).
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpoint(f'its {MANIFEST} is unreadable ({type(e).__name__}: {e})') from None
  # Sizes first: a truncated file is found without reading anything.
  for rel, want in files.items():
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      raise CorruptCheckpoint(f'{rel} is missing')
    if (size := os.path.getsize(full)) != want['bytes']:
      raise CorruptCheckpoint(f'{rel} holds {size} bytes where {want["bytes"]} were saved')
  index, count = share
  # Largest first, dealt in turn: the same shares in every process, of about equal bytes.
  mine = sorted(files, key=lambda r: (-files[r]['bytes'], r))[index::count]
  for rel, crc in sorted(_parallel_crc32(directory, mine).items()):
    if f'{crc:08x}' != files[rel]['crc32']:
      raise CorruptCheckpoint(f'{rel} has CRC-32 {crc:08x} where {files[rel]["crc32"]} was saved '
                              '(its bytes changed after the save)')
  return True


def verify_in_every_process(directory: str) -> bool:
  """`verify_manifest` for a job of many processes: each reads its share of the files, so the
  checkpoint is read once in all rather than once per process, and every process returns, or
  raises, the same: the problem of the lowest-numbered process that found one."""
  if jax.process_count() == 1:
    return verify_manifest(directory)
  problem = None
  try:
    verified = verify_manifest(directory, share=(jax.process_index(), jax.process_count()))
  except (CorruptCheckpoint, OSError) as e:  # OSError: a file that went while being read
    verified, problem = True, str(e)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Each process's verdict as [found a problem, its message's UTF-8 bytes ...]: a fixed-size
  # array every process can gather.
  text = (problem or '').encode()[:_PROBLEM_BYTES]
  mine = np.zeros(1 + _PROBLEM_BYTES, np.uint8)
  mine[0], mine[1:1 + len(text)] = problem is not None, np.frombuffer(text, np.uint8)
  for row in np.asarray(multihost_utils.process_allgather(mine)):
    if row[0]:
      raise CorruptCheckpoint(bytes(row[1:]).rstrip(b'\0').decode(errors='replace'))
  return verified


@jax.jit
def _all_finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(state: TrainState) -> None:
  """Raises NonFiniteCheckpoint naming the first parameter / optimizer / model-state array
  holding NaN or inf (a run never saves one; a damaged or hand-edited checkpoint can)."""
  named = [(f'{part}{jax.tree_util.keystr(path)}', x)
           for part in ('params', 'opt_state', 'model_state')
           for path, x in jax.tree_util.tree_leaves_with_path(getattr(state, part))
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.device_get(_all_finite([x for _, x in named]))
  for (name, x), ok in zip(named, finite):
    if not ok:  # counted only here: half the time of counting every leaf
      n = int(jnp.count_nonzero(~jnp.isfinite(x)))
      raise NonFiniteCheckpoint(f'{name} holds {n} non-finite value(s) of {x.size}')


def _summary(e: BaseException) -> str:
  """An exception as one line: its type and first line, and its root cause's (tensorstore's
  errors reach us wrapped in an orbax message that names an array slice, not the problem)."""
  def line(x):
    text = str(x).strip()
    first = text.splitlines()[0] if text else ''
    first = first.split(' See full TensorStore details')[0]
    return f'{type(x).__name__}: {first[:300]}'
  root, seen = e, {id(e)}
  while True:
    below = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
    if below is None or id(below) in seen:
      break
    root = below
    seen.add(id(root))
  return line(e) if root is e else f'{line(e)} (caused by {line(root)})'


def _say(text: str) -> None:
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


class Checkpointer:
  """Keeps the last `keep` checkpoints under `<workdir>/checkpoints/<step>`.

  Each holds `state` (params, optimizer state, step, RNG), `meta` (JSON: the data iterator
  position and anything the run must remember across a restart) and `integrity.json`.
  Checkpoints found unusable, or newer than train.resume_step, are moved (never deleted) to
  `<workdir>/checkpoints_set_aside/<step>-<reason>-<UTC time>`.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, 'checkpoints')
    self.set_aside_directory = os.path.join(workdir, 'checkpoints_set_aside')
    self._keep, self._async_save = keep, async_save
    self._saving: int | None = None   # the step whose save is in flight
    self.manifest_s: float | None = None  # time the last save spent on its manifest
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    # Always orbax's async checkpointer (a synchronous save waits right after it): only that
    # one runs a callback between writing the items and committing the step.
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)))

  def _seal(self) -> None:
    """Writes the manifest of the step being saved (orbax's finalising thread)."""
    t = time.perf_counter()
    step, self._saving = self._saving, None
    if step is None or jax.process_index() != 0:
      return
    final = os.path.join(self.directory, str(step))
    pending = sorted(glob.glob(glob.escape(final) + _TMP_SUFFIX + '*'), key=os.path.getmtime)
    # An orbax that commits before the callback leaves only the final directory.
    target = pending[-1] if pending else final
    if os.path.isdir(target):
      write_manifest(target)
    self.manifest_s = time.perf_counter() - t

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    self._manager.wait_until_finished()  # orbax's save waits for the previous one anyway
    self._saving = step
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_stored(state)),
                                                     meta=ocp.args.JsonSave(meta)))
    if not self._async_save:
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict[str, Any]]:
    """The state and meta saved at `step`, verified: raises CorruptCheckpoint,
    NonFiniteCheckpoint or CheckpointMismatch, or whatever orbax raises on files it cannot read
    in a checkpoint without a manifest."""
    directory = os.path.join(self.directory, str(step))
    if not os.path.isdir(directory):
      raise CorruptCheckpoint(f'{directory} is gone')
    verified = verify_in_every_process(directory)
    if not verified:
      _say(f'checkpoint: step {step} has no {MANIFEST} (saved before checkpoints carried one); '
           'its files are not verified, only that its values are finite.')
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_stored(target)), meta=ocp.args.JsonRestore()))
    except Exception as e:
      if verified:
        raise CheckpointMismatch(
            f'its files are exactly as saved, yet they do not restore into this run\'s train '
            f'state: {_summary(e)}') from e
      raise
    state = TrainState(**out['state'])
    check_finite(state)
    return state, out['meta']

  def restore_latest_good(self, abstract: TrainState, shardings: TrainState, *,
                          resume_step: int | None = None, on_bad: str = 'fallback'
                          ) -> tuple[TrainState | None, dict[str, Any], int | None]:
    """(state, meta, step) of the newest checkpoint that restores and verifies, or of
    `resume_step`; (None, {}, None) when there is none to resume from.

    Checkpoints newer than `resume_step` are set aside first, so that later saves at their steps
    do not collide. A checkpoint that fails is reported in one paragraph on stderr; with
    on_bad='fallback' it is set aside and the next older one tried (from scratch when none is
    left), with on_bad='fail' nothing is moved and CheckpointError is raised (after closing).
    """
    steps = self.all_steps()
    if resume_step is not None and steps and steps[-1] > resume_step and (
        self._meta_of(steps[-1]).get('resumed_from_step') == resume_step):
      # The setting stays in the command line: a restart of the run that went back must go on
      # from its own newest checkpoint, not go back again.
      _say(f'checkpoint: train.resume_step={resume_step} was applied already (step '
           f'{steps[-1]} was trained from it); resuming from the newest checkpoint.')
      resume_step = None
    if resume_step is not None:
      if resume_step not in steps:
        self.close()
        raise CheckpointError(
            f'train.resume_step={resume_step}: there is no checkpoint at that step in '
            f'{self.directory}; the steps there are {", ".join(map(str, steps)) or "none"}. '
            'Set train.resume_step to one of them, or leave it unset for the newest good one.')
      newer = [s for s in steps if s > resume_step]
      if newer:
        moved = [self._set_aside(s, f'after-resume-step-{resume_step}') for s in newer]
        _say(f'checkpoint: train.resume_step={resume_step}: moved the newer checkpoints '
             f'(steps {", ".join(map(str, newer))}) aside to {", ".join(moved)}; nothing was '
             'deleted.')
        self._reload()
      steps = [s for s in steps if s <= resume_step]
    candidates = steps[::-1]
    for i, step in enumerate(candidates):
      try:
        state, meta = self.restore(step, abstract, shardings)
        if resume_step is not None:
          meta['resumed_from_step'] = resume_step  # carried by every later checkpoint
        return state, meta, step
      except CheckpointMismatch as e:
        self.close()
        raise CheckpointError(
            f'checkpoint: step {step} in {self.directory} cannot be resumed from: {e}. That is '
            'not damage, so nothing was set aside: run with the config (and code) that saved it '
            '(train settings that shape the optimizer state count), or use a new --workdir.'
            ) from e
      except Exception as e:  # any other failure to read the checkpoint makes it unusable
        problem = (f'checkpoint: step {step} in {self.directory} cannot be resumed from: '
                   f'{_summary(e)}.')
        if on_bad != 'fallback':
          self.close()
          raise CheckpointError(
              f'{problem} Nothing was moved or deleted. Set train.on_bad_checkpoint=fallback '
              'to set it aside and resume from the newest older checkpoint that verifies'
              + (f', or train.resume_step to one of {", ".join(map(str, candidates[i + 1:]))}'
                 if candidates[i + 1:] else '') + '.') from e
        reason = 'nonfinite' if isinstance(e, NonFiniteCheckpoint) else 'damaged'
        moved = self._set_aside(step, reason)
        self._reload()
        older = candidates[i + 1:]
        _say(f'{problem} Moved it aside to {moved} (kept, not deleted); '
             + (f'trying the next older checkpoint, step {older[0]}'
                if older else 'no older checkpoint is left, so the run starts from scratch')
             + " (train.on_bad_checkpoint='fallback').")
    return None, {}, None

  def _meta_of(self, step: int) -> dict[str, Any]:
    """The step's metadata JSON as saved ({} where it cannot be read: restoring judges it)."""
    try:
      with open(os.path.join(self.directory, str(step), 'meta', 'metadata')) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def _set_aside(self, step: int, reason: str) -> str:
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    dest = os.path.join(self.set_aside_directory, f'{step}-{reason}-{stamp}')
    n = 1
    while os.path.exists(dest):  # set aside twice within a second
      n += 1
      dest = os.path.join(self.set_aside_directory, f'{step}-{reason}-{stamp}-{n}')
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_directory, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), dest)
    return dest

  def _reload(self) -> None:
    """A new orbax manager, so none of its cached steps names a checkpoint that moved."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('efficientjax checkpoints set aside')
    self._manager.close()
    self._manager = self._new_manager()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
