"""A background sampler of device memory, host RSS, power and utilisation over a run.

AMU (EfficientLLM §5.1) is the memory in use over the whole run, mean and peak, not one
reading at the end; a daemon thread reads `device.memory_stats()` every `interval_s`. The
allocator's own `peak_bytes_in_use` high-water mark catches peaks between samples (it counts
from process start, so it includes compilation and warm-up).
"""

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
  import resource
except ImportError:  # Not on Windows.
  resource = None

MEMORY_STATS_NONE = 'memory_stats() is None on this backend'

MemoryReader = Callable[[Any], Mapping[str, Any] | None]


def host_rss_bytes() -> int | None:
  """This process's resident set size now, from /proc/self/statm; None off Linux."""
  try:
    with open('/proc/self/statm') as f:
      resident_pages = int(f.read().split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return resident_pages * os.sysconf('SC_PAGE_SIZE')


def host_peak_rss_bytes() -> int | None:
  """This process's lifetime peak RSS from getrusage; None where there is no `resource`."""
  if resource is None:
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports kibibytes, macOS bytes.
  return int(peak) if sys.platform == 'darwin' else int(peak) * 1024


def _device_memory_stats(device: Any) -> Mapping[str, Any] | None:
  return device.memory_stats()


def _mean(values: Sequence[float]) -> float | None:
  return float(sum(values) / len(values)) if values else None


def _join(reasons: Sequence[str | None]) -> str | None:
  unique = list(dict.fromkeys(r for r in reasons if r))
  return '; '.join(unique) or None


class Sampler:
  """Samples memory / RSS / power on a daemon thread between `start()` and `stop()`.

  Usage:
    with Sampler(interval_s=0.1, energy_meter=meter) as sampler:
      ...  # the measured steps
    record['memory'] = sampler.summary()

  Every reader is injectable, and `sample_once()` is the whole of one sample, so tests drive it
  directly with fakes and a fake clock.
  """

  def __init__(self, interval_s: float = 0.1, devices: Sequence[Any] | None = None,
               energy_meter: Any = None, clock: Callable[[], float] = time.monotonic,
               read_memory: MemoryReader | None = None,
               read_rss: Callable[[], int | None] | None = None):
    if interval_s <= 0:
      raise ValueError(f'interval_s must be positive, got {interval_s}')
    if devices is None:
      import jax  # pylint: disable=g-import-not-at-top
      devices = jax.local_devices()
    self.interval_s = float(interval_s)
    self.devices = list(devices)
    self.energy_meter = energy_meter
    self.clock = clock
    self._read_memory = read_memory or _device_memory_stats
    self._read_rss = read_rss or host_rss_bytes
    self.overhead_s = 0.0  # Time spent inside sample_once, so the sampler's cost is reported.
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    n = len(self.devices)
    self._times: list[float] = []
    self._in_use: list[list[int]] = [[] for _ in range(n)]
    self._peak_stat: list[int | None] = [None] * n
    self._limit: list[int | None] = [None] * n
    self._memory_reason: list[str | None] = [None] * n
    self._rss: list[int] = []
    self._power_w: list[float] = []  # Summed over devices, one entry per sample.
    self._util_pct: list[float] = []  # Mean over devices, one entry per sample.
    self._power_reason: str | None = None
    self._util_reason: str | None = None
    self._energy_reason: str | None = None
    self._newest: dict[str, Any] = {'bytes_in_use': None, 'host_rss_bytes': None,
                                    'power_w': None}

  # --- sampling -------------------------------------------------------------------------------

  def sample_once(self) -> None:
    """Takes one sample of every source; a failing source records why and is skipped."""
    t0 = self.clock()
    memory = []
    for device in self.devices:
      try:
        memory.append((self._read_memory(device), None))
      except Exception as e:  # pylint: disable=broad-except
        memory.append((None, f'memory_stats() failed: {e}'))
    rss = self._read_rss()
    power, util = self._read_power()
    with self._lock:
      self._times.append(t0)
      for i, (stats, error) in enumerate(memory):
        self._record_memory(i, stats, error)
      if rss is not None:
        self._rss.append(int(rss))
      if power is not None:
        self._power_w.append(power)
      if util is not None:
        self._util_pct.append(util)
      in_use = [stats.get('bytes_in_use') if stats else None for stats, _ in memory]
      self._newest = {
          'bytes_in_use': (sum(in_use) if in_use and None not in in_use else None),
          'host_rss_bytes': None if rss is None else int(rss), 'power_w': power}
      self.overhead_s += self.clock() - t0

  def _record_memory(self, i: int, stats: Mapping[str, Any] | None, error: str | None) -> None:
    if stats is None or 'bytes_in_use' not in stats:
      self._memory_reason[i] = error or (
          MEMORY_STATS_NONE if stats is None else 'memory_stats() has no bytes_in_use')
      return
    self._in_use[i].append(int(stats['bytes_in_use']))
    if stats.get('peak_bytes_in_use') is not None:
      self._peak_stat[i] = int(stats['peak_bytes_in_use'])
    if stats.get('bytes_limit') is not None:
      self._limit[i] = int(stats['bytes_limit'])

  def _read_power(self) -> tuple[float | None, float | None]:
    meter = self.energy_meter
    if meter is None:
      self._power_reason = self._util_reason = 'no energy meter given to the sampler'
      return None, None
    if meter.reason is not None:
      self._power_reason = self._util_reason = meter.reason
      return None, None
    if getattr(meter, 'wraps', False):
      # Unwrapping a wrapping counter needs a read at least once per wrap period; a window
      # longer than that (RAPL: minutes) stays right because the sampler keeps reading.
      try:
        meter.read_j()
      except Exception as e:  # pylint: disable=broad-except
        self._energy_reason = f'{meter.name} energy read failed: {e}'
    power = util = None
    try:
      watts = meter.power_w()
      if watts is None:
        self._power_reason = f'{meter.name} has no instantaneous power reading'
      else:
        power = float(sum(watts))
    except Exception as e:  # pylint: disable=broad-except
      self._power_reason = f'{meter.name} power read failed: {e}'
    read_util = getattr(meter, 'utilization_pct', None)
    try:
      pct = read_util() if read_util is not None else None
      if pct is None:
        self._util_reason = f'{meter.name} has no utilisation reading'
      elif pct:
        util = float(sum(pct) / len(pct))
    except Exception as e:  # pylint: disable=broad-except
      self._util_reason = f'{meter.name} utilisation read failed: {e}'
    return power, util

  # --- the thread -----------------------------------------------------------------------------

  def start(self) -> 'Sampler':
    if self._thread is not None:
      raise RuntimeError('Sampler already started')
    self._stop.clear()
    self.sample_once()  # The state at the start, however short the run.
    self._thread = threading.Thread(target=self._run, name='efficientjax-sampler', daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    # Deadlines on the real clock keep the rate steady however long a sample takes.
    deadline = time.monotonic() + self.interval_s
    while not self._stop.wait(max(0.0, deadline - time.monotonic())):
      self.sample_once()
      deadline = max(deadline + self.interval_s, time.monotonic())

  def stop(self) -> dict[str, Any]:
    """Stops the thread, takes a last sample (the allocator's final peak) and summarises."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self.sample_once()
    return self.summary()

  def __enter__(self) -> 'Sampler':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def latest(self) -> dict[str, Any]:
    """The newest sample: device bytes in use summed over the devices (None unless every
    device had a reading in it), host RSS and power (W, summed over devices), each None where
    that sample had none. For live curves (efficientjax/metrics/tensorboard.py), which then
    cost the loop a lock, not a device query."""
    with self._lock:
      return dict(self._newest)

  # --- the result -----------------------------------------------------------------------------

  def summary(self) -> dict[str, Any]:
    """Means and peaks of everything sampled; None with a reason for what could not be read.

    The aggregated peak is the sum of per-device peaks, an upper bound on the simultaneous
    total; the aggregated AMU is total mean bytes over total limit.
    """
    with self._lock:
      devices = []
      for i, device in enumerate(self.devices):
        in_use = self._in_use[i]
        mean = _mean(in_use)
        peaks = in_use + ([self._peak_stat[i]] if self._peak_stat[i] is not None else [])
        limit = self._limit[i]
        devices.append({
            'id': getattr(device, 'id', i),
            'kind': getattr(device, 'device_kind', None),
            'bytes_in_use_mean': mean,
            'bytes_in_use_peak': max(peaks) if in_use else None,
            'bytes_limit': limit,
            'amu': mean / limit if mean is not None and limit else None,
        })
      complete = bool(devices) and all(d['bytes_in_use_mean'] is not None for d in devices)
      limits_known = complete and all(d['bytes_limit'] for d in devices)
      mean_total = sum(d['bytes_in_use_mean'] for d in devices) if complete else None
      limit_total = sum(d['bytes_limit'] for d in devices) if limits_known else None
      reasons = []
      if not self._times:
        reasons.append('no samples taken')
      elif not devices:
        reasons.append('no devices to sample')
      # A device that failed once but was sampled otherwise still has its numbers.
      reasons.extend(r for r, in_use in zip(self._memory_reason, self._in_use) if not in_use)
      rss_peak = max(self._rss) if self._rss else None
      if self._times and not self._rss:
        rss_peak = host_peak_rss_bytes()
        reasons.append('host RSS unreadable (no /proc/self/statm); peak is the process '
                       'lifetime ru_maxrss' if rss_peak is not None else 'host RSS unreadable')
      if not self._power_w:
        reasons.append(self._power_reason)
      if not self._util_pct:
        reasons.append(self._util_reason)
      reasons.append(self._energy_reason)
      n = len(self._times)
      return {
          'interval_s': self.interval_s,
          'samples': n,
          'duration_s': self._times[-1] - self._times[0] if n else None,
          'overhead_s': self.overhead_s,
          'devices': devices,
          'bytes_in_use_mean': mean_total,
          'bytes_in_use_peak': sum(d['bytes_in_use_peak'] for d in devices) if complete else None,
          'bytes_limit': limit_total,
          'amu': mean_total / limit_total if limit_total else None,
          'host_rss_bytes_mean': _mean(self._rss),
          'host_rss_bytes_peak': rss_peak,
          'power_w_mean': _mean(self._power_w),
          'power_w_peak': max(self._power_w) if self._power_w else None,
          'utilization_pct_mean': _mean(self._util_pct),
          'reason': _join(reasons),
      }
