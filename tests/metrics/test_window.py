"""The measurement window: time and energy with pauses subtracted, over fake meters and clocks."""

import json

import pytest

from efficientjax.metrics.energy import NvmlEnergy, make_energy_meter
from efficientjax.metrics.window import MIN_UPDATES_PER_WINDOW, MeasurementWindow
from tests.metrics.test_sampling import (FakeClock, FakeMeter, install_fake_nvml, make_powercap,
                                         set_energy_uj)

ENERGY_KEYS = {'source', 'scope', 'energy_j', 'energy_j_per_device', 'avg_power_w',
               'counter_update_period_s', 'reliable', 'reason'}


class _FakeMeter:
  name, scope, update_period_s, reason = 'fake', 'gpu', 0.1, None

  def __init__(self, clock):
    self.clock = clock

  def read_j(self):
    # 300 W on device 0, 100 W on device 1, since t = 0.
    return [300.0 * self.clock.t, 100.0 * self.clock.t]


class _Clock:
  t = 0.0

  def __call__(self):
    return self.t


def _clocked_meter(clock, watts=(100.0, 200.0), period=0.1):
  # Counters that integrate constant power exactly: E_i(t) = W_i * t.
  return FakeMeter(energy_j=lambda: [w * clock.t for w in watts], update_period_s=period)


def _energy(window):
  out = window.energy()
  json.dumps(out, allow_nan=False)  # What the record writes must be plain JSON.
  assert set(out) == ENERGY_KEYS
  assert isinstance(out['reliable'], bool)  # record_schema.json requires a boolean.
  return out


# --- pauses and reliability -----------------------------------------------------------------


def test_window_subtracts_pauses_in_time_and_energy():
  clock = _Clock()
  w = MeasurementWindow(_FakeMeter(clock), clock=clock)
  clock.t = 10.0
  w.open()
  clock.t = 12.0
  w.pause()
  clock.t = 15.0  # 3 s of evaluation
  w.resume()
  clock.t = 20.0
  w.close()
  assert w.seconds == 7.0 and w.paused_s == 3.0
  e = _energy(w)
  assert e['energy_j_per_device'] == [2100.0, 700.0]
  assert e['energy_j'] == 2800.0 and e['avg_power_w'] == 400.0 and e['reliable']


def test_short_window_is_flagged():
  clock = _Clock()
  w = MeasurementWindow(_FakeMeter(clock), clock=clock)
  w.open()
  clock.t = 0.5
  w.close()
  e = _energy(w)
  assert not e['reliable'] and 'measure more steps' in e['reason']
  assert e['energy_j'] == 200.0  # still the measured value, flagged, not replaced


def test_window_short_is_flagged_unreliable():
  clock = FakeClock(1.0)
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  window.open()
  clock.t = 1.5
  window.close()
  out = _energy(window)
  assert MIN_UPDATES_PER_WINDOW == 10
  assert out['reliable'] is False
  assert out['counter_update_period_s'] == 0.1
  assert out['reason'] == ('the window of 0.5 s is under 10 x the counter update period 0.1 s; '
                           'measure more steps')
  assert out['energy_j'] == 150.0  # Measured anyway; the caller decides to lengthen.


def test_window_long_is_reliable_and_power_is_exact():
  clock = FakeClock(1.0)
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  window.open()
  clock.t = 3.0
  window.close()
  assert window.seconds == 2.0
  assert _energy(window) == {
      'source': 'fake', 'scope': 'gpu', 'energy_j': 600.0, 'energy_j_per_device': [200.0, 400.0],
      'avg_power_w': 300.0, 'counter_update_period_s': 0.1, 'reliable': True, 'reason': None,
  }


@pytest.mark.parametrize('seconds, reliable', [(0.99, False), (1.0, True), (1.01, True)])
def test_reliable_from_exactly_ten_update_periods(seconds, reliable):
  # docs/metrics.md: a window under 10 update periods (here 10 x 0.1 s) is flagged; 10 is not.
  clock = FakeClock(0.0)
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  window.open()
  clock.t = seconds
  window.close()
  out = _energy(window)
  assert out['reliable'] is reliable
  assert (out['reason'] is None) is reliable


def test_reliability_is_judged_on_the_window_without_its_pauses():
  # 3 s of wall time of which 2.5 s evaluation: 0.5 s of training, under 10 x 0.1 s.
  clock = FakeClock(0.0)
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  window.open()
  clock.t = 0.25
  window.pause()
  clock.t = 2.75
  window.resume()
  clock.t = 3.0
  window.close()
  out = _energy(window)
  assert window.seconds == 0.5 and window.paused_s == 2.5
  assert out['energy_j'] == 150.0 and out['avg_power_w'] == 300.0
  assert out['reliable'] is False and 'window of 0.5 s' in out['reason']


def test_window_unknown_update_period_is_not_reliable():
  clock = FakeClock(0.0)
  window = MeasurementWindow(_clocked_meter(clock, period=None), clock=clock)
  window.open()
  clock.t = 100.0
  window.close()
  out = _energy(window)
  assert out['energy_j'] == 30_000.0 and out['avg_power_w'] == 300.0
  assert (out['reliable'], out['reason']) == (False, 'counter update period unknown')


def test_window_of_zero_length_has_no_average_power():
  clock = FakeClock(5.0)
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  window.open()
  window.close()
  out = _energy(window)
  assert window.seconds == 0.0
  assert out['energy_j'] == 0.0
  assert out['avg_power_w'] is None  # No time passed: no power, not a division error.
  assert out['reliable'] is False


# --- real meters over fake counters ---------------------------------------------------------


def test_rapl_window_average_power(tmp_path):
  powercap = make_powercap(tmp_path)
  clock = FakeClock(100.0)
  meter = make_energy_meter('cpu', powercap_root=str(powercap))
  window = MeasurementWindow(meter, clock=clock)
  window.open()
  set_energy_uj(powercap, 'intel-rapl:0', 250)  # Wrapped: +750 µJ.
  set_energy_uj(powercap, 'intel-rapl:1', 10 + 3_000_000)
  clock.t = 102.0
  window.close()
  out = _energy(window)
  assert out['energy_j_per_device'] == [750e-6, 3.0]
  assert out['energy_j'] == 750e-6 + 3.0
  assert out['avg_power_w'] == (750e-6 + 3.0) / 2.0
  assert (out['source'], out['scope'], out['reliable'], out['reason']) == (
      'rapl', 'cpu_package', True, None)


def test_window_over_fake_nvml(monkeypatch):
  nvml = install_fake_nvml(monkeypatch)
  clock = FakeClock(0.0)
  meter = NvmlEnergy([0, 1])
  window = MeasurementWindow(meter, clock=clock)
  window.open()
  nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: [1000 + 300_000, 2500 + 100_000][h[1]]
  clock.t = 2.0
  window.close()
  out = _energy(window)
  assert out['energy_j_per_device'] == [300.0, 100.0]
  assert out['avg_power_w'] == 200.0
  assert (out['source'], out['scope'], out['reliable']) == ('nvml', 'gpu', True)


# --- no meter, failing meters, misuse -------------------------------------------------------


def test_unavailable_meter_gives_nulls_with_its_reason():
  class Off:
    name, scope, update_period_s, reason = 'none', None, None, 'no counter here'
  clock = _Clock()
  w = MeasurementWindow(Off(), clock=clock)
  w.open()
  clock.t = 1.0
  w.close()
  e = _energy(w)
  assert e['energy_j'] is None and e['avg_power_w'] is None and e['reason'] == 'no counter here'
  assert e['reliable'] is False and w.seconds == 1.0


def test_no_meter_at_all():
  clock = FakeClock()
  w = MeasurementWindow(clock=clock)
  w.open()
  w.close()
  assert _energy(w)['reason'] == 'no energy meter'


@pytest.mark.parametrize('failing_read', [0, 1, 2, 3], ids=['open', 'pause', 'resume', 'close'])
def test_window_counter_failure_loses_the_energy_not_the_run(failing_read):
  clock = FakeClock()
  reads = []

  def read():
    reads.append(clock.t)
    if len(reads) - 1 == failing_read:
      raise OSError('counter gone')
    return [100.0 * clock.t]

  window = MeasurementWindow(FakeMeter(energy_j=read), clock=clock)
  window.open()
  clock.t = 2.0
  window.pause()
  clock.t = 3.0
  window.resume()
  clock.t = 10.0
  window.close()
  assert len(reads) == failing_read + 1  # No reads after the first failure.
  assert window.seconds == 9.0  # The timing survives the lost counter.
  out = _energy(window)
  assert out['energy_j'] is None and out['energy_j_per_device'] is None
  assert out['avg_power_w'] is None and out['scope'] is None
  assert (out['source'], out['reliable'], out['reason']) == (
      'fake', False, 'energy counter read failed: counter gone')


def test_window_misuse():
  clock = FakeClock()
  window = MeasurementWindow(_clocked_meter(clock), clock=clock)
  # Never opened: nulls with a reason, not a crash (a run shorter than its warm-up).
  assert window.seconds is None
  assert _energy(window)['reason'] == 'the measurement window was not opened and closed'
  with pytest.raises(RuntimeError, match='not open'):
    window.close()
  with pytest.raises(RuntimeError, match='outside an open window'):
    window.pause()
  with pytest.raises(RuntimeError, match='without pause'):
    window.resume()
  window.open()
  with pytest.raises(RuntimeError, match='twice'):
    window.open()
  window.pause()
  with pytest.raises(RuntimeError, match='already paused'):
    window.pause()
  clock.t = 4.0
  window.close()  # Closing while paused ends the pause: none of it was training.
  assert (window.seconds, window.paused_s) == (0.0, 4.0)
  assert _energy(window)['energy_j'] == 0.0
  with pytest.raises(RuntimeError, match='not open'):
    window.close()


def test_window_drives_the_sampler():
  class Sampler:

    def __init__(self):
      self.calls = []

    def start(self):
      self.calls.append('start')

    def stop(self):
      self.calls.append('stop')

  sampler = Sampler()
  window = MeasurementWindow(sampler=sampler, clock=FakeClock())
  window.open()
  assert sampler.calls == ['start']
  window.close()
  assert sampler.calls == ['start', 'stop']
