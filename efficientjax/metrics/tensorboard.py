"""A run's curves as TensorBoard event files, beside its profiler trace.

TensorBoard treats a directory holding event files as one run, and its profile plugin finds
that run's xprof captures at `<run dir>/plugins/profile/<session>/*.xplane.pb`, which is where
`jax.profiler` writes under the directory it is given. So the curves are written into the
run's trace directory (`<workdir>/trace`, or `<workdir>/trace/process_0` in a job of several
processes), and `tensorboard --logdir runs/` shows each run's scalars and trace side by side.

Scalars are what the run measured, nothing estimated: a reading the backend does not have
(device memory on a CPU, power without NVML or RAPL) is not written at all, rather than as
zeros. tensorboardX writes the files (no TensorFlow needed); only process 0 writes, as it
writes the other logs.
"""

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

# Event files go to <workdir>/TRACE_DIR: the folder jax.profiler traces into.
TRACE_DIR = 'trace'


def run_dir(workdir: str) -> str:
  """This process's trace directory, where its profile and its curves go. A folder per
  process in a job of several: the profiler names its file after the host, which processes on
  one machine share."""
  path = os.path.join(os.path.abspath(workdir), TRACE_DIR)
  if jax.process_count() > 1:
    path = os.path.join(path, f'process_{jax.process_index()}')
  return path


class Curves:
  """Scalar curves of one run. `scalar(tag, value, step)` skips a value that is None (not
  measured here); everything else, a non-finite loss included, is written as it was.

  Values are held in memory, with their wall time, until `flush()` (and `close()`) writes
  them, synchronously: tensorboardX's SummaryWriter takes ~60 µs a scalar (a pickle through
  a multiprocessing queue to a writer thread; ~0.3 ms for a step's five, a tenth of a 3 ms
  step inside a timed window), and its flush() does not wait for that queue. The training
  loop flushes only while its window is paused (evaluations, checkpoints) and at the end; a
  run killed in between loses the curve since its last flush (its train_log.jsonl has it).
  """

  def __init__(self, logdir: str, *, enabled: bool | None = None):
    self.logdir = logdir
    if enabled is None:
      enabled = jax.process_index() == 0
    self._file = None
    self._pending: list[tuple[str, float, int, float]] = []
    if enabled:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      self._file = EventsWriter(os.path.join(logdir, 'events'))

  def scalar(self, tag: str, value: float | None, step: int) -> None:
    if self._file is None or value is None:
      return
    self._pending.append((tag, float(value), int(step), time.time()))

  def scalars(self, values: Mapping[str, float | None], step: int) -> None:
    for tag, value in values.items():
      self.scalar(tag, value, step)

  def flush(self) -> None:
    if self._file is None:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    for tag, value, step, wall_time in self._pending:
      self._file.write_event(event_pb2.Event(summary=summary.scalar(tag, value), step=step,
                                             wall_time=wall_time))
    self._pending.clear()
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None


def perplexity(loss: float | None) -> float | None:
  """exp(loss), or None for a loss that is None; inf where it overflows."""
  if loss is None:
    return None
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


def sampled(latest: Mapping[str, Any] | None) -> dict[str, float | None]:
  """The memory and power curves' values from a sampler's newest sample
  (`efficientjax.metrics.sampler.Sampler.latest`): None where it had no reading."""
  latest = latest or {}
  return {'memory/bytes_in_use': latest.get('bytes_in_use'),
          'memory/host_rss_bytes': latest.get('host_rss_bytes'),
          'power/power_w': latest.get('power_w')}


def write_inference(curves: Curves, result: Any) -> None:
  """An inference run's curves (result: efficientjax.infer.run.InferenceResult): per request
  in the order given (TTFT, TPOT, end to end, ms), per engine decode step (its time, busy
  slots and the tokens it produced per second), and the window's totals at step 0 (quality,
  throughput, memory and power: serving has no steps of its own to plot them over)."""
  from efficientjax.metrics import latency as latency_lib  # pylint: disable=g-import-not-at-top
  for i, c in enumerate(result.completions):
    t = latency_lib.RequestTimes(c.arrival_s, c.token_s)
    curves.scalars({'request/ttft_ms': _ms(t.ttft_s), 'request/tpot_ms': _ms(t.tpot_s),
                    'request/e2e_ms': _ms(t.e2e_s), 'request/output_tokens': t.n_out}, i)
  stats = result.stats
  for i, (seconds, busy) in enumerate(zip(stats.decode_step_s, stats.decode_active_slots)):
    curves.scalars({'decode/step_ms': seconds * 1e3, 'decode/active_slots': busy,
                    'decode/tokens_per_s': busy / seconds if seconds > 0 else None}, i)
  for i, seconds in enumerate(stats.prefill_s):
    curves.scalar('prefill/request_ms', seconds * 1e3, i)
  window = result.window_s
  output_tokens = sum(len(c.tokens) for c in result.completions)
  s, q = result.sampler, result.quality
  curves.scalars({
      'eval/loss': q.get('eval_loss'), 'eval/perplexity': q.get('eval_perplexity'),
      'serve/output_tokens_per_s': output_tokens / window if window else None,
      'serve/requests_per_s': len(result.completions) / window if window else None,
      'memory/bytes_in_use_mean': s.get('bytes_in_use_mean'),
      'memory/bytes_in_use_peak': s.get('bytes_in_use_peak'),
      'memory/host_rss_bytes_mean': s.get('host_rss_bytes_mean'),
      'memory/host_rss_bytes_peak': s.get('host_rss_bytes_peak'),
      'power/power_w_mean': s.get('power_w_mean'),
      'energy/avg_power_w': result.energy.get('avg_power_w'),
  }, 0)


def _ms(seconds: float | None) -> float | None:
  return seconds * 1e3 if seconds is not None else None
