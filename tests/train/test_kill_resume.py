"""A real SIGKILL of the real command, during training and asynchronous checkpoint saves: the
restart continues bitwise where the killed run's newest checkpoint left it, sets nothing aside
and writes exactly one record."""

import json
import os
import signal
import subprocess
import sys
import time

from efficientjax.metrics.record import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ('--config=configs/quickstart.py:smoke', '--config.train.steps=10',
        '--config.train.checkpoint_every=2', '--config.train.eval_every=0',
        '--config.train.log_every=1')


def _command(workdir):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  # Compile-bound, as the suite (tests/conftest.py); every run here has the same flags.
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return [sys.executable, '-m', 'experiments.main', *ARGS, f'--workdir={workdir}'], env


def _losses(workdir):
  """step -> loss, the last line of each step winning (a restart logs its steps again)."""
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return {line['step']: line['loss'] for line in map(json.loads, f)}


def _lines(workdir):
  try:
    with open(os.path.join(workdir, 'train_log.jsonl')) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def test_sigkill_mid_run_then_restart_is_bitwise_and_records_once(tmp_path):
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  argv, env = _command(straight)
  reference = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
  argv, env = _command(killed)
  victim = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  # Killed after step 7 is logged: checkpoints 2-6 exist, the save of 6 may still be in flight.
  deadline = time.monotonic() + 240
  while _lines(killed) < 7 and victim.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  assert victim.poll() is None, 'the run ended before it could be killed'
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not os.path.exists(os.path.join(killed, 'results.jsonl'))

  restart = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in restart.stderr
  assert reference.wait(timeout=300) == 0
  assert not os.path.exists(os.path.join(killed, 'checkpoints_set_aside'))
  want, got = _losses(straight), _losses(killed)
  assert sorted(got) == list(range(1, 11))
  assert got == want  # bitwise: the same floats, step for step
  [record] = read_records(os.path.join(killed, 'results.jsonl'))
  [uninterrupted] = read_records(os.path.join(straight, 'results.jsonl'))
  # The newest checkpoint the kill left complete (6 unless its save was still in flight).
  assert record['steps']['start'] in (4, 6, 8)
  # The held-out losses too; the initial one was carried in the checkpoints.
  for key in ('eval_loss', 'initial_eval_loss'):
    assert record['quality'][key] == uninterrupted['quality'][key]
  # The killed run's log keeps its steps; the restart appends from the checkpoint's step on.
  with open(os.path.join(killed, 'train_log.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  start = record['steps']['start']
  assert steps[-(10 - start):] == list(range(start + 1, 11)) and steps[:7] == list(range(1, 8))
  # And the same command once more: complete, no second record.
  again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and 'already complete' in again.stdout
  with open(os.path.join(killed, 'results.jsonl')) as f:
    assert len(f.readlines()) == 1
