"""Energy meters: cumulative hardware counters read at both ends of a measured window.

AEC (EfficientLLM §5.1) is average power and energy per token over a run. The figures here
come only from counters the hardware keeps: NVML's total-energy counter on NVIDIA GPUs, the
Linux powercap (RAPL) counters on CPUs. Where there is no counter the meter says why, and the
measurement window (`window.MeasurementWindow`) reports `None`; nothing is ever estimated from
TDP or utilisation.
"""

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

DEFAULT_POWERCAP_ROOT = '/sys/class/powercap'

# The NVML total-energy counter moves about every 100 ms: 30 changes in 3.0 s on an H100
# (experiments/results/h100/metrics_probe/metrics_probe.json, 'energy_counter_change_times_s').
NVML_UPDATE_PERIOD_S = 0.1

# RAPL energy-status registers update about every 1 ms (Intel SDM vol. 3B, "Platform Specific
# Power Management Support"; AMD's RAPL MSRs follow the same scheme). Documented, not measured
# here: no machine we ran on exposed readable RAPL counters.
RAPL_UPDATE_PERIOD_S = 0.001

# Top-level powercap zones only: 'intel-rapl:0' is a package, 'intel-rapl:0:1' a subzone
# (core, uncore, dram) already counted in it, and 'intel-rapl-mmio:0' a second interface to
# the same package counter. Summing any of those with the package would count energy twice.
_TOP_LEVEL_RAPL_ZONE = re.compile(r'^(?:intel|amd)-rapl:(\d+)$')


class EnergyMeter(Protocol):
  """A cumulative energy counter per device (GPU) or per package (CPU)."""

  name: str  # 'nvml' | 'rapl' | 'none'
  scope: str | None  # 'gpu' | 'module' | 'cpu_package' | None
  update_period_s: float | None
  reason: str | None  # Why the meter cannot read; None when it can.

  def read_j(self) -> list[float]:
    """Cumulative joules per device / package; differences between reads are what count."""
    ...

  def power_w(self) -> list[float] | None:
    """Instantaneous watts per device where the source reports it, else None."""
    ...


class NoEnergy:
  """A meter for a platform without any energy counter."""

  name = 'none'
  scope = None
  update_period_s = None

  def __init__(self, reason: str):
    self.reason = reason

  def read_j(self) -> list[float]:
    raise RuntimeError(self.reason)

  def power_w(self) -> list[float] | None:
    return None


def _text(value: str | bytes) -> str:
  # Older nvidia-ml-py releases return bytes for names and UUIDs, newer ones str.
  return value.decode() if isinstance(value, bytes) else value


def nvml_indices(devices: Sequence[Any], *, environ: Mapping[str, str] | None = None,
                 nvml_uuids: Callable[[], Sequence[str]] | None = None) -> list[int]:
  """The NVML index of each local JAX GPU device.

  NVML enumerates every GPU on the host and ignores `CUDA_VISIBLE_DEVICES`, while CUDA (and so
  JAX's `local_hardware_id`) numbers only the visible ones. With the variable set, the device's
  CUDA ordinal picks an entry of it: an NVML index, or a 'GPU-<uuid>' (or unique prefix, as CUDA
  accepts) matched against `nvml_uuids()`. Without it the CUDA ordinal is the NVML index; that
  holds when both orders follow the PCI bus, which is the case on a host of identical GPUs.

  Raises:
    ValueError: an entry that names no NVML device, or a MIG instance (its energy counter
      belongs to the whole physical GPU, shared with other instances).
  """
  environ = os.environ if environ is None else environ
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  entries = [e.strip() for e in visible.split(',')] if visible else None
  by_id = sorted(devices, key=lambda d: d.id)
  uuids = None
  indices = []
  for device in devices:
    ordinal = getattr(device, 'local_hardware_id', None)
    if ordinal is None:
      ordinal = by_id.index(device)
    if entries is None:
      indices.append(int(ordinal))
      continue
    if ordinal >= len(entries):
      raise ValueError(f'device {device.id} has CUDA ordinal {ordinal} but '
                       f'CUDA_VISIBLE_DEVICES={visible!r} names only {len(entries)}')
    entry = entries[ordinal]
    if entry.isdigit():
      indices.append(int(entry))
    elif entry.startswith('GPU-'):
      if uuids is None:
        if nvml_uuids is None:
          raise ValueError(f'CUDA_VISIBLE_DEVICES entry {entry!r} is a UUID and no NVML UUIDs '
                           'were given to match it')
        uuids = [_text(u) for u in nvml_uuids()]
      matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
      if len(matches) != 1:
        raise ValueError(f'CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(matches)} NVML '
                         f'devices (UUIDs: {uuids})')
      indices.append(matches[0])
    elif entry.startswith('MIG-'):
      raise ValueError(f'CUDA_VISIBLE_DEVICES entry {entry!r} is a MIG instance; the energy '
                       'counter covers the whole GPU, shared with other instances')
    else:
      raise ValueError(f'cannot read CUDA_VISIBLE_DEVICES entry {entry!r}')
  return indices


class NvmlEnergy:
  """NVML's total-energy counter (mJ since driver load), power (mW) and utilisation (%).

  On a GH200 the counter covers the Grace-Hopper module (CPU, GPU and their memory), so its
  scope is 'module'; elsewhere it is the GPU board ('gpu').
  """

  name = 'nvml'
  update_period_s = NVML_UPDATE_PERIOD_S

  def __init__(self, device_indices: Sequence[int] | None = None, *,
               devices: Sequence[Any] | None = None,
               environ: Mapping[str, str] | None = None):
    """Opens NVML for `device_indices`, or for the JAX GPU `devices` mapped with `nvml_indices`.

    Never raises: any failure leaves the meter unavailable, with `reason` saying why.
    """
    self.reason = None
    self.scope = None
    self.device_indices: list[int] = []
    self.device_names: list[str] = []
    self._handles: list[Any] = []
    self._nvml = None
    try:
      import pynvml  # pylint: disable=g-import-not-at-top
      pynvml.nvmlInit()
      self._nvml = pynvml
      if device_indices is None:
        device_indices = nvml_indices(devices or [], environ=environ,
                                      nvml_uuids=lambda: self._all_uuids(pynvml))
      if not device_indices:
        raise ValueError('no GPU devices to measure')
      self.device_indices = [int(i) for i in device_indices]
      self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.device_indices]
      self.device_names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
      # Pre-Volta GPUs have no energy counter; find out now rather than mid-run.
      self.read_j()
    except Exception as e:  # pylint: disable=broad-except
      # ImportError, any NVMLError subclass, a bad index: each means no counter to read.
      self.reason = f'NVML not available: {str(e) or type(e).__name__}'
      self._handles = []
      self.close()
      return
    self.scope = 'module' if any('GH200' in n for n in self.device_names) else 'gpu'

  @staticmethod
  def _all_uuids(pynvml: Any) -> list[str]:
    return [_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())]

  def read_j(self) -> list[float]:
    if self.reason is not None:
      raise RuntimeError(self.reason)
    return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3 for h in self._handles]

  def power_w(self) -> list[float] | None:
    if self.reason is not None:
      return None
    return [self._nvml.nvmlDeviceGetPowerUsage(h) / 1e3 for h in self._handles]

  def utilization_pct(self) -> list[float] | None:
    """Percent of the last sample period in which a kernel ran (not SM occupancy)."""
    if self.reason is not None:
      return None
    return [float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._handles]

  def close(self) -> None:
    # nvmlInit / nvmlShutdown are reference counted, so this releases only our own init.
    if self._nvml is not None:
      nvml, self._nvml = self._nvml, None
      self.reason = self.reason or 'NVML closed'
      try:
        nvml.nvmlShutdown()
      except Exception:  # pylint: disable=broad-except
        pass  # Nothing left to measure either way.


class RaplEnergy:
  """Linux powercap RAPL package counters (`<root>/intel-rapl:N/energy_uj`, µJ).

  The counters wrap at `max_energy_range_uj` (a few minutes to an hour at full power), so each
  read unwraps against the previous one: reads must come at least once per wrap period. The
  `Sampler` reads wrapping meters on every sample for that reason (`wraps = True`).
  """

  name = 'rapl'
  scope = 'cpu_package'
  update_period_s = RAPL_UPDATE_PERIOD_S
  wraps = True

  def __init__(self, root: str = DEFAULT_POWERCAP_ROOT):
    """Finds the top-level package zones under `root`; never raises (see `reason`)."""
    self.root = root
    self.reason = None
    self.zones: list[str] = []
    self._max_range_uj: list[int] = []
    self._last_uj: list[int] = []
    self._total_uj: list[int] = []
    self._lock = threading.Lock()
    problems = []
    try:
      names = os.listdir(root)
    except OSError as e:
      names = []
      problems.append(f'{e.strerror}: {root}')
    zones = sorted((n for n in names if _TOP_LEVEL_RAPL_ZONE.match(n)),
                   key=lambda n: (n.split(':')[0], int(n.split(':')[1])))
    for zone in zones:
      path = os.path.join(root, zone)
      # 'psys' (platform) is a top-level zone that contains the packages; skip it.
      zone_name = self._read(os.path.join(path, 'name'), default='package')
      if not zone_name.startswith('package'):
        continue
      try:
        # energy_uj is root-only on kernels patched for the PLATYPUS side channel (2020).
        raw = int(self._read(os.path.join(path, 'energy_uj')))
        max_range = int(self._read(os.path.join(path, 'max_energy_range_uj')))
      except (OSError, ValueError) as e:
        problems.append(f'{getattr(e, "strerror", None) or e}: {getattr(e, "filename", path)}')
        continue
      self.zones.append(zone)
      self._max_range_uj.append(max_range)
      self._last_uj.append(raw)
      self._total_uj.append(0)
    if problems or not self.zones:
      # A partly readable machine would undercount; better no number than a wrong one.
      detail = f' ({"; ".join(problems)})' if problems else ''
      self.reason = f'no readable RAPL counters under {root}{detail}'
      self.zones = []

  @staticmethod
  def _read(path: str, default: str | None = None) -> str:
    try:
      with open(path) as f:
        return f.read().strip()
    except OSError:
      if default is None:
        raise
      return default

  def read_j(self) -> list[float]:
    """Joules per package since this meter was created."""
    if self.reason is not None:
      raise RuntimeError(self.reason)
    with self._lock:  # The sampler thread and the caller's window both read.
      for i, zone in enumerate(self.zones):
        raw = int(self._read(os.path.join(self.root, zone, 'energy_uj')))
        delta = raw - self._last_uj[i]
        if delta < 0:
          delta += self._max_range_uj[i]
        self._total_uj[i] += delta
        self._last_uj[i] = raw
      return [t / 1e6 for t in self._total_uj]

  def power_w(self) -> list[float] | None:
    return None


def make_energy_meter(backend: str, devices: Sequence[Any] | None = None, *,
                      powercap_root: str = DEFAULT_POWERCAP_ROOT) -> EnergyMeter:
  """The energy counter for a JAX backend's local devices, or a meter saying why there is none."""
  if backend in ('gpu', 'cuda'):
    if devices is None:
      import jax  # pylint: disable=g-import-not-at-top
      devices = jax.local_devices()
    return NvmlEnergy(devices=devices)
  if backend == 'cpu':
    return RaplEnergy(powercap_root)
  if backend == 'tpu':
    return NoEnergy('no energy counter on TPU VMs')
  return NoEnergy(f'no energy counter known for backend {backend!r}')

