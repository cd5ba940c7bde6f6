"""The measurement window: where rates, averages and energy of a run are taken.

It opens after compilation and warm-up and closes after the last measured step, with the
device synchronised at both ends. Evaluations and checkpoint saves inside it are paused out:
their time and their energy are subtracted, so the window holds training steps only.

Energy comes from the meter's cumulative counters read at each of those points. A counter that
fails to read loses the energy of this window, never the run: the window still times the steps
and reports null energy with the reason.
"""

import time
from collections.abc import Callable
from typing import Any

import jax

# A window must span this many counter updates: each end can be off by up to one update's
# worth of energy, so 10 updates bound the error to about 10-20%.
MIN_UPDATES_PER_WINDOW = 10


class MeasurementWindow:
  """Training time and energy between `open()` and `close()`, pauses subtracted.

  Usage:
    window = MeasurementWindow(meter, sampler)
    window.open(state)
    ...  # training steps; window.pause(state) / window.resume() around evaluation
    window.close(state)
    window.seconds, window.energy()
  """

  def __init__(self, energy_meter=None, sampler=None,
               clock: Callable[[], float] = time.perf_counter):
    self._meter = energy_meter if energy_meter is not None and energy_meter.reason is None else None
    self._unavailable_meter = energy_meter if self._meter is None else None
    self._sampler = sampler
    self._clock = clock
    self._t0 = self._t1 = None
    self._paused_at = None
    self.paused_s = 0.0
    self._e0 = self._e1 = None
    self._e_paused_at = None
    self._e_paused = None
    self._energy_error: str | None = None
    self.steps = 0

  @property
  def is_open(self) -> bool:
    return self._t0 is not None and self._t1 is None

  def _energy(self) -> list[float] | None:
    """The meter's counters now, or None once any read has failed (the window's energy is lost)."""
    if self._meter is None or self._energy_error is not None:
      return None
    try:
      return self._meter.read_j()
    except Exception as e:  # pylint: disable=broad-except
      # A counter that fails mid-run (NVML lost, a RAPL file gone) costs this window's energy;
      # the steps already run and their timing are still worth reporting.
      self._energy_error = f'energy counter read failed: {e}'
      return None

  def open(self, *sync: Any) -> None:
    if self._t0 is not None:
      raise RuntimeError('MeasurementWindow.open() called twice')
    jax.block_until_ready(sync)
    if self._sampler is not None:
      self._sampler.start()
    self._e0 = self._energy()
    self._e_paused = [0.0] * len(self._e0) if self._e0 is not None else None
    self._t0 = self._clock()

  def pause(self, *sync: Any) -> None:
    if not self.is_open:
      raise RuntimeError('MeasurementWindow.pause() outside an open window')
    if self._paused_at is not None:
      raise RuntimeError('MeasurementWindow.pause() while already paused')
    jax.block_until_ready(sync)
    self._paused_at = self._clock()
    self._e_paused_at = self._energy()

  def resume(self) -> None:
    if self._paused_at is None:
      raise RuntimeError('MeasurementWindow.resume() without pause()')
    self.paused_s += self._clock() - self._paused_at
    now = self._energy()
    if now is not None and self._e_paused_at is not None:
      self._e_paused = [p + (n - a) for p, n, a in zip(self._e_paused, now, self._e_paused_at)]
    self._paused_at = self._e_paused_at = None

  def close(self, *sync: Any) -> None:
    if not self.is_open:
      raise RuntimeError('MeasurementWindow.close() on a window that is not open')
    if self._paused_at is not None:
      # Whatever ran since pause() was not training either: end the pause here.
      self.resume()
    jax.block_until_ready(sync)
    self._t1 = self._clock()
    self._e1 = self._energy()
    if self._sampler is not None:
      self._sampler.stop()

  @property
  def seconds(self) -> float | None:
    if self._t0 is None or self._t1 is None:
      return None
    return self._t1 - self._t0 - self.paused_s

  def _no_energy(self, source: str, reason: str) -> dict[str, Any]:
    # The schema wants `reliable` a boolean: with no measurement there is nothing to rely on.
    return {'source': source, 'scope': None, 'energy_j': None, 'energy_j_per_device': None,
            'avg_power_w': None, 'counter_update_period_s': None, 'reliable': False,
            'reason': reason}

  def energy(self) -> dict[str, Any]:
    """Energy over the window (pauses subtracted), or nulls with the reason."""
    if self._meter is None:
      meter = self._unavailable_meter
      return self._no_energy(getattr(meter, 'name', 'none'),
                             getattr(meter, 'reason', None) or 'no energy meter')
    if self._energy_error is not None:
      return self._no_energy(self._meter.name, self._energy_error)
    seconds = self.seconds
    if seconds is None:
      return self._no_energy(self._meter.name, 'the measurement window was not opened and closed')
    per_device = [float(e1 - e0 - p) for e0, e1, p in zip(self._e0, self._e1, self._e_paused)]
    total = float(sum(per_device))
    period = self._meter.update_period_s
    if period is None:
      reliable, reason = False, 'counter update period unknown'
    elif seconds < MIN_UPDATES_PER_WINDOW * period:
      reliable = False
      reason = (f'the window of {seconds:.3g} s is under {MIN_UPDATES_PER_WINDOW} x the counter '
                f'update period {period:g} s; measure more steps')
    else:
      reliable, reason = True, None
    return {'source': self._meter.name, 'scope': self._meter.scope, 'energy_j': total,
            'energy_j_per_device': per_device,
            # A zero-length window has no average power, rather than a division error.
            'avg_power_w': total / seconds if seconds > 0 else None,
            'counter_update_period_s': period, 'reliable': reliable, 'reason': reason}
