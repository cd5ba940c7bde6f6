"""`python -m experiments.main` as a real job of two processes with 4 CPU devices each (gloo
collectives, one workdir): it trains what one process on 8 devices trains, survives the SIGKILL
of a process by resuming from its checkpoint, and writes each record, log line and checkpoint
once.

One module fixture runs everything (the suite runs a file on one worker, `--dist loadfile`): an
uninterrupted job and a job killed after its first checkpoint start together, the killed one is
restarted, and this process trains the same config on its own 8 devices meanwhile.
"""

import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficientjax.metrics.record import read_records
from efficientjax.train.checkpoint import MANIFEST, verify_manifest
from efficientjax.train.loop import TrainResult, train
from tests.helpers import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# quickstart:smoke (6 steps, checkpoints at 3 and 6) with a batch that splits over 8 devices.
OVERRIDES = {'train.global_batch_size': 8}
ARGS = ('--config=configs/quickstart.py:smoke',
        *(f'--config.{k}={v}' for k, v in OVERRIDES.items()))
# A process whose peer died exits at once when its collective fails; one blocked in a collective
# (XLA's CPU collectives can wait on the process's own devices for ever) is ended by the
# coordinator once the dead process has missed its heartbeats for this long.
HEARTBEAT_TIMEOUT_S = 10
SURVIVOR_EXIT_S = HEARTBEAT_TIMEOUT_S + 20
# The two processes' all-reduce (gloo, across processes) adds the 8 devices' partial sums in
# another order than one process's own all-reduce: float32 losses differ in their last bits
# (measured: at most 2 ulp, 1e-6 absolute, at ~5.9). A process reading the wrong rows of the
# batch, or a missing gradient share, moves them by 1e-2 or more.
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class _Job:
  procs: list[subprocess.Popen]
  logs: list[str]

  def wait(self, timeout: float) -> list[int]:
    return [p.wait(timeout=timeout) for p in self.procs]

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _job(workdir, cache, name: str, *extra: str) -> _Job:
  """Both processes of one job, started: 4 CPU devices each, one coordinator."""
  port, procs, logs = _free_port(), [], []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(
        # Compile-bound, as the suite's own processes (tests/conftest.py).
        XLA_FLAGS='--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0',
        JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
        JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
        EFFICIENTJAX_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
        # Speed only: the restart reads back what the first two jobs compiled (same programs).
        JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
        PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    logs.append(str(workdir) + f'.{name}.process_{i}.log')
    with open(logs[-1], 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'experiments.main', *ARGS, *extra, f'--workdir={workdir}'],
          cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
  return _Job(procs, logs)


def _log(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict[int, float]:
  """step -> loss, the last line of each step winning (a restart logs its steps again)."""
  return {line['step']: line['loss'] for line in _log(workdir)}


@dataclasses.dataclass
class _Runs:
  straight: str
  killed: str
  single: TrainResult
  straight_job: _Job
  restart_job: _Job
  survivor_exit_s: float
  survivor_rc: int
  damaged_file: str


def _process_1_file(checkpoint: str) -> str:
  """The largest file only process 1 reads when the job verifies `checkpoint`: files sorted
  largest first are dealt to the processes in turn (efficientjax/train/checkpoint.py)."""
  with open(os.path.join(checkpoint, MANIFEST)) as f:
    files = json.load(f)['files']
  return sorted(files, key=lambda r: (-files[r]['bytes'], r))[1::2][0]


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> _Runs:
  root = tmp_path_factory.mktemp('multiprocess')
  straight, killed, cache = str(root / 'straight'), str(root / 'killed'), root / 'xla_cache'
  # The uninterrupted job also profiles a step (every process traces its own devices).
  jobs = [_job(straight, cache, 'straight', '--config.profile.steps=1'),
          _job(killed, cache, 'victim')]
  try:
    straight_job, victim = jobs
    first = os.path.join(killed, 'checkpoints', '3')
    deadline = time.monotonic() + 240
    while (not os.path.isdir(first) and time.monotonic() < deadline
           and all(p.poll() is None for p in victim.procs)):
      time.sleep(0.01)
    assert all(p.poll() is None for p in victim.procs), (
        'the job ended before it could be killed:\n' + victim.output(0)[-3000:])
    victim.procs[1].send_signal(signal.SIGKILL)  # not the coordinator: the harder survivor
    t_kill = time.monotonic()
    try:
      survivor_rc = victim.procs[0].wait(timeout=SURVIVOR_EXIT_S)
    except subprocess.TimeoutExpired:
      victim.kill()
      pytest.fail(f'process 0 still ran {SURVIVOR_EXIT_S} s after process 1 was killed (killed '
                  'it too):\n' + victim.output(0)[-3000:])
    survivor_exit_s = time.monotonic() - t_kill
    victim.procs[1].wait()

    # A damaged newest checkpoint in a file that only process 1 verifies: both processes must
    # set it aside and go on from step 3 (a process going on alone would hang or diverge).
    shutil.copytree(first, os.path.join(killed, 'checkpoints', '4'))
    damaged = _process_1_file(os.path.join(killed, 'checkpoints', '4'))
    with open(os.path.join(killed, 'checkpoints', '4', damaged), 'r+b') as f:
      f.seek(os.path.getsize(f.name) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))

    restart = _job(killed, cache, 'restart')
    jobs.append(restart)
    # The same config on this process's own 8 devices, while the jobs run.
    single = train(smoke_config(**OVERRIDES), str(root / 'single'), progress=False)
    for job in (straight_job, restart):
      rcs = job.wait(timeout=180)
      assert rcs == [0, 0], f'exit codes {rcs}:\n' + job.output(0)[-3000:] + job.output(1)[-3000:]
  finally:
    for job in jobs:
      job.kill()
  return _Runs(straight, killed, single, straight_job, restart, survivor_exit_s, survivor_rc,
               damaged)


def test_two_processes_train_what_one_process_on_8_devices_trains(runs):
  two, one = _losses(runs.straight), runs.single.losses
  assert sorted(two) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)],
                             rtol=RTOL, atol=0)
  [record] = read_records(os.path.join(runs.straight, 'results.jsonl'))
  assert record['env']['process_count'] == 2 and record['env']['device_count'] == 8
  assert record['env']['local_device_count'] == 4
  np.testing.assert_allclose(record['quality']['eval_loss'], runs.single.final_eval_loss,
                             rtol=RTOL, atol=0)
  np.testing.assert_allclose(record['quality']['initial_eval_loss'],
                             runs.single.initial_eval_loss, rtol=RTOL, atol=0)


def test_a_killed_process_ends_the_job_and_both_resume_from_the_checkpoint(runs):
  assert runs.survivor_rc != 0 and runs.survivor_exit_s < SURVIVOR_EXIT_S
  restart = runs.restart_job.output(0)
  # The damaged copy was set aside by both, on process 1's finding alone (process 0 never read
  # that file), and the job went on from step 3.
  assert f'{runs.damaged_file} has CRC-32' in restart, restart[-3000:]
  assert 'resumed from the checkpoint at step 3' in restart, restart[-3000:]
  [aside] = os.listdir(os.path.join(runs.killed, 'checkpoints_set_aside'))
  assert aside.startswith('4-damaged-')
  [record] = read_records(os.path.join(runs.killed, 'results.jsonl'))
  [uninterrupted] = read_records(os.path.join(runs.straight, 'results.jsonl'))
  assert record['steps']['start'] == 3 and record['steps']['final'] == 6
  # Bitwise: the same job shape, the same state restored.
  assert _losses(runs.killed) == _losses(runs.straight)
  # (The record's train_loss is the mean over the steps its own process ran: 4-6 here.)
  for key in ('eval_loss', 'initial_eval_loss'):
    assert record['quality'][key] == uninterrupted['quality'][key], key
  # The restart appended steps 4-6 after what the killed job had logged (3 steps, or a few
  # more whose lines were written before the kill).
  steps = [line['step'] for line in _log(runs.killed)]
  assert steps[:3] == [1, 2, 3] and steps[-3:] == [4, 5, 6]


def test_records_log_lines_and_checkpoints_are_written_once(runs):
  workdir = runs.straight
  assert len(read_records(os.path.join(workdir, 'results.jsonl'))) == 1
  assert [line['step'] for line in _log(workdir)] == list(range(1, 7))
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'results.jsonl',
                                         'trace', 'train_log.jsonl']
  # A trace folder per process: the profiler names its file after the host, which both share.
  assert sorted(os.listdir(os.path.join(workdir, 'trace'))) == ['process_0', 'process_1']
  for i in range(2):
    found = glob.glob(os.path.join(workdir, 'trace', f'process_{i}', '**', '*.xplane.pb'),
                      recursive=True)
    assert len(found) == 1, found
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['global_batch_size'] == 8
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  for step in ('3', '6'):
    directory = os.path.join(workdir, 'checkpoints', step)
    with open(os.path.join(directory, MANIFEST)) as f:
      files = json.load(f)['files']
    # One checkpoint holding both processes' shards, one manifest (process 0's) covering them.
    assert {'state/array_metadatas/process_0', 'state/array_metadatas/process_1'} <= set(files)
    assert any(r.startswith('state/ocdbt.process_1/') for r in files)
    assert verify_manifest(directory)
  # Process 0 speaks for the job: the progress lines and the record's path once.
  zero, one = runs.straight_job.output(0), runs.straight_job.output(1)
  assert 'step 6/6' in zero and 'result record:' in zero
  assert 'step 6/6' not in one and 'result record:' not in one and 'eval loss' not in one


def test_a_multi_process_run_needs_one_named_workdir(tmp_path):
  # Each process would name its own default workdir from its own clock. A one-process job
  # described as distributed is enough to reach the check (and costs no second process).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
             JAX_NUM_PROCESSES='1', JAX_PROCESS_ID='0',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-m', 'experiments.main',
                         f'--config={ROOT}/configs/quickstart.py:smoke'], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith('config error: --workdir: a multi-process run needs one --workdir')
  assert os.listdir(tmp_path) == []


def test_the_jobs_energy_sums_every_processs_devices(monkeypatch):
  # Each process meters only its own devices: the record's energy (and so J/token) is the sum.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from efficientjax.train import loop  # pylint: disable=g-import-not-at-top
  n = jax.local_device_count()
  peer = {'per_device': [5.0] * n, 'reliable': False}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', lambda x: np.stack(
      [x, np.asarray(peer['per_device'] if x.dtype != np.bool_ else peer['reliable'],
                     x.dtype)]))
  mine = {'source': 'nvml', 'scope': 'gpu', 'energy_j': 2.0 * n, 'energy_j_per_device': [2.0] * n,
          'avg_power_w': 1.0, 'reliable': True, 'reason': None}
  job = loop._job_energy(mine, seconds=7.0)  # pylint: disable=protected-access
  assert job['energy_j'] == 7.0 * n and job['avg_power_w'] == 7.0 * n / 7.0
  assert job['energy_j_per_device'] == [2.0] * n + [5.0] * n
  assert job['reliable'] is False and 'summed over' in job['scope']
  peer['per_device'] = [float('nan')] * n  # a process without a reading: no job total
  assert loop._job_energy(mine, seconds=7.0)['energy_j'] is None  # pylint: disable=protected-access
