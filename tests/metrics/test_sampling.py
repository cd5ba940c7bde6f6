"""The memory / power sampler and the energy meters, proved with fakes and a fake clock.

The measurement window over these meters is tested in test_window.py.
"""

import builtins
import errno
import json
import sys
import time
import types

import jax
import pytest

from efficientjax.metrics import energy
from efficientjax.metrics import sampler as sampler_lib
from efficientjax.metrics.energy import NoEnergy, NvmlEnergy, RaplEnergy
from efficientjax.metrics.sampler import Sampler
from efficientjax.metrics.window import MeasurementWindow


class FakeClock:
  """A clock that moves only when told to."""

  def __init__(self, t: float = 0.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


class FakeDevice:

  def __init__(self, id, kind='fake', local_hardware_id=None):  # pylint: disable=redefined-builtin
    self.id = id
    self.device_kind = kind
    self.local_hardware_id = local_hardware_id


class FakeMeter:
  """An energy meter whose counters, power and utilisation come from scripted lists."""

  name = 'fake'
  scope = 'gpu'
  reason = None

  def __init__(self, energy_j=None, power=None, util=None, update_period_s=0.1):
    self.update_period_s = update_period_s
    self._energy = energy_j
    self._power = iter(power or [])
    self._util = iter(util or [])
    self.reads = 0

  def read_j(self):
    self.reads += 1
    return self._energy()

  def power_w(self):
    return next(self._power)

  def utilization_pct(self):
    return next(self._util)


def _closed_window(meter):
  # An unavailable meter: the window must still open and close, and report why it has no energy.
  clock = FakeClock()
  window = MeasurementWindow(meter, clock=clock)
  window.open()
  clock.t = 1.0
  window.close()
  return window


# --- the sampler ----------------------------------------------------------------------------


def test_sampler_means_peaks_and_amu_are_exact():
  clock = FakeClock()
  a, b = FakeDevice(0, 'A'), FakeDevice(1, 'B')
  stats = {
      a: iter([{'bytes_in_use': 100, 'peak_bytes_in_use': 250, 'bytes_limit': 1000},
               {'bytes_in_use': 200, 'peak_bytes_in_use': 350, 'bytes_limit': 1000},
               {'bytes_in_use': 300, 'peak_bytes_in_use': 400, 'bytes_limit': 1000}]),
      b: iter([{'bytes_in_use': 10, 'peak_bytes_in_use': 10, 'bytes_limit': 100},
               {'bytes_in_use': 10, 'peak_bytes_in_use': 20, 'bytes_limit': 100},
               {'bytes_in_use': 40, 'peak_bytes_in_use': 30, 'bytes_limit': 100}]),
  }

  def read_memory(device):
    clock.t += 0.25  # Each read costs a quarter second of fake time: the sampler's overhead.
    return next(stats[device])

  rss = iter([1000, 3000, 2000])
  meter = FakeMeter(power=[[100.0, 50.0], [200.0, 100.0], [150.0, 150.0]],
                    util=[[50.0, 100.0], [0.0, 0.0], [30.0, 30.0]])
  s = Sampler(interval_s=10.0, devices=[a, b], energy_meter=meter, clock=clock,
              read_memory=read_memory, read_rss=lambda: next(rss))
  for _ in range(3):
    s.sample_once()
    clock.t += 10.0
  out = s.summary()
  json.dumps(out, allow_nan=False)

  assert out['samples'] == 3
  assert out['interval_s'] == 10.0
  assert out['duration_s'] == 21.0  # Samples at 0, 10.5 and 21 on the fake clock.
  assert s.overhead_s == out['overhead_s'] == 1.5
  assert out['devices'] == [
      # A's peak is the allocator's last high-water mark (400), above every sample.
      {'id': 0, 'kind': 'A', 'bytes_in_use_mean': 200.0, 'bytes_in_use_peak': 400,
       'bytes_limit': 1000, 'amu': 0.2},
      # B's sampled 40 exceeds its last peak stat (30): the larger wins.
      {'id': 1, 'kind': 'B', 'bytes_in_use_mean': 20.0, 'bytes_in_use_peak': 40,
       'bytes_limit': 100, 'amu': 0.2},
  ]
  assert out['bytes_in_use_mean'] == 220.0
  assert out['bytes_in_use_peak'] == 440
  assert out['bytes_limit'] == 1100
  assert out['amu'] == 0.2
  assert out['host_rss_bytes_mean'] == 2000.0
  assert out['host_rss_bytes_peak'] == 3000
  assert out['power_w_mean'] == 250.0  # Per-sample sums 150, 300, 300.
  assert out['power_w_peak'] == 300.0
  assert out['utilization_pct_mean'] == 35.0  # Per-sample device means 75, 0, 30.
  assert out['reason'] is None


def test_sampler_memory_stats_none_gives_none_and_reason():
  s = Sampler(devices=[FakeDevice(0), FakeDevice(1)], clock=FakeClock(),
              read_memory=lambda d: None, read_rss=lambda: 4096)
  s.sample_once()
  s.sample_once()
  out = s.summary()
  json.dumps(out, allow_nan=False)
  assert out['samples'] == 2
  for d in out['devices']:
    assert d['bytes_in_use_mean'] is None and d['bytes_in_use_peak'] is None
    assert d['amu'] is None
  for key in ('bytes_in_use_mean', 'bytes_in_use_peak', 'bytes_limit', 'amu', 'power_w_mean',
              'power_w_peak', 'utilization_pct_mean'):
    assert out[key] is None, key
  assert out['host_rss_bytes_mean'] == 4096.0
  # One reason per cause, however many devices share it.
  assert out['reason'] == ('memory_stats() is None on this backend; '
                           'no energy meter given to the sampler')


def test_sampler_one_device_missing_leaves_the_total_none():
  stats = {0: {'bytes_in_use': 5, 'bytes_limit': 10}, 1: None}
  s = Sampler(devices=[FakeDevice(0), FakeDevice(1)], clock=FakeClock(),
              read_memory=lambda d: stats[d.id], read_rss=lambda: 1,
              energy_meter=NoEnergy('no energy counter on TPU VMs'))
  s.sample_once()
  out = s.summary()
  assert out['devices'][0]['amu'] == 0.5
  assert out['devices'][0]['bytes_in_use_peak'] == 5  # No peak stat: the sampled maximum.
  assert out['bytes_in_use_mean'] is None and out['amu'] is None
  assert out['reason'] == 'memory_stats() is None on this backend; no energy counter on TPU VMs'


def test_sampler_survives_a_failing_reader():
  calls = iter([RuntimeError('device lost'), {'bytes_in_use': 8, 'bytes_limit': 16}])

  def read_memory(device):
    r = next(calls)
    if isinstance(r, Exception):
      raise r
    return r

  s = Sampler(devices=[FakeDevice(0)], clock=FakeClock(), read_memory=read_memory,
              read_rss=lambda: 1)
  s.sample_once()
  assert 'memory_stats() failed: device lost' in s.summary()['reason']
  s.sample_once()
  out = s.summary()
  # Sampled once successfully: the numbers stand and the old failure is no longer the reason.
  assert out['bytes_in_use_mean'] == 8.0 and out['amu'] == 0.5
  assert 'memory_stats()' not in out['reason']


def test_sampler_rss_falls_back_to_lifetime_peak():
  s = Sampler(devices=[], clock=FakeClock(), read_rss=lambda: None)
  s.sample_once()
  out = s.summary()
  assert out['host_rss_bytes_mean'] is None
  assert out['host_rss_bytes_peak'] == sampler_lib.host_peak_rss_bytes() > 0
  assert 'ru_maxrss' in out['reason']


def test_host_rss_readers():
  # Not now <= peak: Linux updates the ru_maxrss high-water mark lazily, so it can lag.
  now, peak = sampler_lib.host_rss_bytes(), sampler_lib.host_peak_rss_bytes()
  assert now > 100 * 2**20 and peak > 100 * 2**20  # jax alone is over 100 MiB resident.


def test_sampler_without_samples():
  out = Sampler(devices=[FakeDevice(0)], clock=FakeClock()).summary()
  assert out['samples'] == 0 and out['duration_s'] is None
  assert out['bytes_in_use_mean'] is None and out['host_rss_bytes_peak'] is None
  assert out['reason'].startswith('no samples taken')


def test_sampler_keeps_reading_a_wrapping_counter():
  meter = FakeMeter(energy_j=lambda: [0.0], power=[None] * 3, util=[None] * 3)
  meter.wraps = True
  s = Sampler(devices=[], energy_meter=meter, clock=FakeClock(), read_rss=lambda: 1)
  for _ in range(3):
    s.sample_once()
  assert meter.reads == 3
  out = s.summary()
  assert out['power_w_mean'] is None
  assert out['reason'] == ('no devices to sample; fake has no instantaneous power reading; '
                           'fake has no utilisation reading')


def test_sampler_thread_on_this_cpu_machine():
  # What the sampler relies on for CPU: jax's CPU client keeps no allocator statistics.
  assert jax.local_devices()[0].memory_stats() is None
  meter = energy.make_energy_meter('cpu', jax.local_devices())
  with Sampler(interval_s=0.01, energy_meter=meter) as s:
    time.sleep(0.1)
  out = s.summary()
  json.dumps(out, allow_nan=False)
  assert out['samples'] >= 3
  assert len(out['devices']) == jax.local_device_count() == 8
  assert out['host_rss_bytes_mean'] > 0 and out['host_rss_bytes_peak'] > 0
  assert out['bytes_in_use_mean'] is None and out['amu'] is None
  assert 'memory_stats() is None on this backend' in out['reason']
  assert 0 < out['overhead_s'] < out['duration_s']
  assert s._thread is None  # pylint: disable=protected-access


def test_sampler_rejects_bad_use():
  with pytest.raises(ValueError, match='positive'):
    Sampler(interval_s=0, devices=[])
  s = Sampler(interval_s=0.01, devices=[], read_rss=lambda: 1)
  s.start()
  try:
    with pytest.raises(RuntimeError, match='already started'):
      s.start()
  finally:
    s.stop()


# --- RAPL -----------------------------------------------------------------------------------


def _zone(root, zone, name, energy_uj, max_uj=1000):
  path = root / zone
  path.mkdir()
  (path / 'name').write_text(name + '\n')
  (path / 'energy_uj').write_text(f'{energy_uj}\n')
  (path / 'max_energy_range_uj').write_text(f'{max_uj}\n')
  return path


def make_powercap(root):
  """Two packages, a subzone, the duplicate MMIO interface and a platform zone under `root`."""
  (root / 'intel-rapl').mkdir()  # The control-type directory, not a zone.
  _zone(root, 'intel-rapl:0', 'package-0', 500)
  _zone(root, 'intel-rapl:0:0', 'core', 7)
  _zone(root, 'intel-rapl:1', 'package-1', 10, max_uj=10**9)
  _zone(root, 'intel-rapl-mmio:0', 'package-0', 500)
  _zone(root, 'intel-rapl:2', 'psys', 3)
  return root


@pytest.fixture
def powercap(tmp_path):
  return make_powercap(tmp_path)


def set_energy_uj(root, zone, energy_uj):
  (root / zone / 'energy_uj').write_text(f'{energy_uj}\n')


def test_rapl_reads_top_level_packages_and_unwraps(powercap):
  meter = RaplEnergy(str(powercap))
  assert meter.reason is None
  assert meter.zones == ['intel-rapl:0', 'intel-rapl:1']
  assert (meter.name, meter.scope, meter.update_period_s) == ('rapl', 'cpu_package', 0.001)
  assert meter.power_w() is None
  assert meter.read_j() == [0.0, 0.0]
  set_energy_uj(powercap, 'intel-rapl:0', 900)
  set_energy_uj(powercap, 'intel-rapl:1', 2_000_010)
  assert meter.read_j() == [400e-6, 2.0]
  set_energy_uj(powercap, 'intel-rapl:0', 100)  # Wrapped at 1000: +100 to the top, +100 after.
  assert meter.read_j() == [600e-6, 2.0]
  # A subzone moving changes nothing: it is inside its package already.
  set_energy_uj(powercap, 'intel-rapl:0:0', 999)
  assert meter.read_j() == [600e-6, 2.0]


def test_rapl_permission_denied_is_unavailable(powercap, monkeypatch):
  # Tests may run as root, which chmod cannot lock out; refuse the read the way the kernel does.
  real_open = builtins.open

  def guarded_open(path, *args, **kwargs):
    if str(path).endswith('energy_uj'):
      raise PermissionError(errno.EACCES, 'Permission denied', str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(energy, 'open', guarded_open, raising=False)
  meter = RaplEnergy(str(powercap))
  assert meter.reason.startswith(f'no readable RAPL counters under {powercap} (Permission denied')
  assert 'intel-rapl:0/energy_uj' in meter.reason
  with pytest.raises(RuntimeError, match='no readable RAPL'):
    meter.read_j()
  out = _closed_window(meter).energy()
  assert out['energy_j'] is None and out['avg_power_w'] is None and out['scope'] is None
  assert (out['source'], out['reliable'], out['reason']) == ('rapl', False, meter.reason)


def test_rapl_absent_or_empty_is_unavailable(tmp_path):
  missing = RaplEnergy(str(tmp_path / 'nope'))
  assert missing.reason.startswith(f'no readable RAPL counters under {tmp_path / "nope"}')
  empty = RaplEnergy(str(tmp_path))
  assert empty.reason == f'no readable RAPL counters under {tmp_path}'


def test_rapl_amd_zone_names(tmp_path):
  _zone(tmp_path, 'amd-rapl:0', 'package-0', 1)
  assert RaplEnergy(str(tmp_path)).zones == ['amd-rapl:0']


def test_make_energy_meter_cpu_on_this_machine():
  meter = energy.make_energy_meter('cpu', jax.local_devices())
  assert meter.name == 'rapl'
  if meter.reason is None:
    readings = meter.read_j()
    assert readings and all(r >= 0 for r in readings)
    assert meter.scope == 'cpu_package'
  else:
    assert meter.reason.startswith('no readable RAPL counters under /sys/class/powercap')
    out = _closed_window(meter).energy()
    assert out['energy_j'] is None and out['reason'] == meter.reason


def test_tpu_and_unknown_backends_have_no_counter():
  tpu = energy.make_energy_meter('tpu', [])
  assert (tpu.name, tpu.scope, tpu.reason) == ('none', None, 'no energy counter on TPU VMs')
  assert tpu.power_w() is None
  out = _closed_window(tpu).energy()
  assert {k: out[k] for k in ('energy_j', 'avg_power_w', 'reason', 'source', 'scope',
                              'reliable')} == {
      'energy_j': None, 'avg_power_w': None, 'reason': 'no energy counter on TPU VMs',
      'source': 'none', 'scope': None, 'reliable': False}
  assert 'metal' in energy.make_energy_meter('metal', []).reason


# --- NVML -----------------------------------------------------------------------------------


class FakeNVMLError(Exception):
  pass


def fake_pynvml(names, uuids, energy_mj, power_mw, util, init_error=None, energy_error=None):
  """A stand-in for the pynvml module: NVML index i has names[i], uuids[i], and so on."""
  m = types.ModuleType('pynvml')
  m.NVMLError = FakeNVMLError
  m.inits = 0

  def nvml_init():
    if init_error:
      raise FakeNVMLError(init_error)
    m.inits += 1

  def shutdown():
    m.inits -= 1

  def handle(i):
    if not 0 <= i < len(names):
      raise FakeNVMLError('Invalid Argument')
    return ('handle', i)

  def total_energy(h):
    if energy_error:
      raise FakeNVMLError(energy_error)
    return energy_mj[h[1]]

  m.nvmlInit = nvml_init
  m.nvmlShutdown = shutdown
  m.nvmlDeviceGetCount = lambda: len(names)
  m.nvmlDeviceGetHandleByIndex = handle
  m.nvmlDeviceGetName = lambda h: names[h[1]].encode()  # Older releases return bytes.
  m.nvmlDeviceGetUUID = lambda h: uuids[h[1]]
  m.nvmlDeviceGetTotalEnergyConsumption = total_energy
  m.nvmlDeviceGetPowerUsage = lambda h: power_mw[h[1]]
  m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=util[h[1]], memory=0)
  return m


UUIDS = ['GPU-aaaa-0000', 'GPU-bbbb-1111', 'GPU-cccc-2222']


def install_fake_nvml(monkeypatch):
  """Three H100s behind a fake pynvml, and no CUDA_VISIBLE_DEVICES."""
  m = fake_pynvml(['NVIDIA H100 80GB HBM3'] * 3, UUIDS, energy_mj=[1000, 2500, 7000],
                  power_mw=[100_000, 250_500, 700_000], util=[10, 50, 100])
  monkeypatch.setitem(sys.modules, 'pynvml', m)
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  return m


@pytest.fixture
def nvml(monkeypatch):
  return install_fake_nvml(monkeypatch)


def test_nvml_units_and_scope(nvml):
  meter = NvmlEnergy([2, 0])
  assert meter.reason is None
  assert (meter.name, meter.scope, meter.update_period_s) == ('nvml', 'gpu', 0.1)
  assert meter.device_names == ['NVIDIA H100 80GB HBM3'] * 2
  assert meter.read_j() == [7.0, 1.0]
  assert meter.power_w() == [700.0, 100.0]
  assert meter.utilization_pct() == [100.0, 10.0]
  meter.close()
  assert nvml.inits == 0


def test_nvml_gh200_counts_the_module(monkeypatch):
  m = fake_pynvml(['NVIDIA GH200 480GB'], UUIDS[:1], [5], [1], [0])
  monkeypatch.setitem(sys.modules, 'pynvml', m)
  assert NvmlEnergy([0]).scope == 'module'


def test_nvml_maps_jax_devices_through_cuda_visible_devices(nvml, monkeypatch):
  devices = [FakeDevice(0, local_hardware_id=0), FakeDevice(1, local_hardware_id=1)]
  assert energy.make_energy_meter('gpu', devices).device_indices == [0, 1]
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,0')
  meter = energy.make_energy_meter('gpu', devices)
  assert meter.device_indices == [2, 0]
  assert meter.read_j() == [7.0, 1.0]
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', 'GPU-cccc, GPU-aaaa-0000')  # Prefixes, as CUDA.
  assert energy.make_energy_meter('gpu', devices).device_indices == [2, 0]


def test_nvml_indices_without_the_environment():
  env = {}
  # A second process on the host sees global ids 4, 5 but CUDA ordinals 1, 0.
  devices = [FakeDevice(4, local_hardware_id=1), FakeDevice(5, local_hardware_id=0)]
  assert energy.nvml_indices(devices, environ=env) == [1, 0]
  # No hardware id: position in id order.
  devices = [FakeDevice(9), FakeDevice(3)]
  assert energy.nvml_indices(devices, environ=env) == [1, 0]
  assert energy.nvml_indices(devices, environ={'CUDA_VISIBLE_DEVICES': ''}) == [1, 0]


@pytest.mark.parametrize('visible, match', [
    ('3', 'names only 1'),
    ('0,GPU-dddd', 'matches 0 NVML devices'),
    ('0,GPU-', 'matches 3 NVML devices'),
    ('0,MIG-1234', 'MIG instance'),
    ('0,gpu1', 'cannot read'),
])
def test_nvml_indices_errors(visible, match):
  devices = [FakeDevice(0, local_hardware_id=0), FakeDevice(1, local_hardware_id=1)]
  with pytest.raises(ValueError, match=match):
    energy.nvml_indices(devices, environ={'CUDA_VISIBLE_DEVICES': visible},
                        nvml_uuids=lambda: UUIDS)


def test_nvml_failures_are_unavailable_with_reason(monkeypatch):
  m = fake_pynvml([], [], [], [], [], init_error='NVML Shared Library Not Found')
  monkeypatch.setitem(sys.modules, 'pynvml', m)
  meter = energy.make_energy_meter('gpu', [FakeDevice(0, local_hardware_id=0)])
  assert meter.reason == 'NVML not available: NVML Shared Library Not Found'
  assert meter.power_w() is None and meter.utilization_pct() is None and meter.scope is None
  with pytest.raises(RuntimeError, match='NVML not available'):
    meter.read_j()
  out = _closed_window(meter).energy()
  assert {k: out[k] for k in ('energy_j', 'avg_power_w', 'reason', 'source', 'scope',
                              'reliable')} == {
      'energy_j': None, 'avg_power_w': None, 'source': 'nvml', 'scope': None,
      'reason': 'NVML not available: NVML Shared Library Not Found', 'reliable': False}

  # Pre-Volta GPUs: NVML works but has no energy counter; found at construction, not mid-run.
  m = fake_pynvml(['Tesla P100'], UUIDS[:1], [0], [0], [0], energy_error='Not Supported')
  monkeypatch.setitem(sys.modules, 'pynvml', m)
  assert NvmlEnergy([0]).reason == 'NVML not available: Not Supported'
  assert m.inits == 0  # The failed meter released its NVML init.
  assert NvmlEnergy([5]).reason == 'NVML not available: Invalid Argument'

  monkeypatch.setitem(sys.modules, 'pynvml', None)  # Not installed: import fails.
  assert NvmlEnergy([0]).reason.startswith('NVML not available: ')
  assert NvmlEnergy(devices=[]).reason.startswith('NVML not available: ')


def test_real_pynvml_on_this_machine():
  """Whatever this machine has, the meter is a reading or a reason, never an exception."""
  pytest.importorskip('pynvml')
  devices = [FakeDevice(0, local_hardware_id=0)]
  meter = NvmlEnergy(devices=devices, environ={})
  if meter.reason is None:
    assert len(meter.read_j()) == 1
    meter.close()
  else:
    assert meter.reason.startswith('NVML not available: ')
