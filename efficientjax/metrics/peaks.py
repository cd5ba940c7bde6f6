"""Peak dense bf16 FLOP/s per device, the denominator of MFU, and peak memory bandwidth per
device, the denominator of memory-bandwidth utilisation (MBU).

Datasheet figures (FLOP/s without structured sparsity). Matched by substring of
`device.device_kind`, most specific first (an 'H100 PCIe' must not match the SXM entry).
"""

PEAK_BF16_FLOPS_PER_S: tuple[tuple[str, float], ...] = (
    ('GH200', 989.4e12),        # Grace-Hopper superchip: the H100 SXM tensor cores
    ('H200 NVL', 835.0e12),     # the PCIe card at its lower power: 1,671 with sparsity
    ('H200', 989.4e12),         # same chip as H100 SXM, more and faster memory
    ('H100 PCIe', 756.0e12),
    ('H100 NVL', 835.0e12),
    ('H100', 989.4e12),         # SXM5, e.g. 'NVIDIA H100 80GB HBM3'
    ('A100', 312.0e12),
    ('TPU v6 lite', 918.0e12),  # v6e (Trillium)
    ('TPU v6e', 918.0e12),
    ('TPU v5 lite', 197.0e12),  # v5e
    ('TPU v5e', 197.0e12),
    ('TPU v5p', 459.0e12),
    ('TPU v5', 459.0e12),       # v5p reports 'TPU v5'
    ('TPU v4', 275.0e12),
)


def _lookup(table: tuple[tuple[str, float], ...], device_kind: str, override: float | None,
            field: str, what: str, datasheet: str) -> tuple[float | None, str]:
  """(the config's override, or the table's first entry whose key is in `device_kind`; where
  it came from or why it is missing)."""
  if override:
    return float(override), f'config: metrics.{field}'
  for key, peak in table:
    if key.lower() in device_kind.lower():
      return peak, f'table: {key} ({datasheet})'
  return None, f'no {what} known for device kind {device_kind!r}; set --config.metrics.{field}'


def peak_flops_per_s(device_kind: str, override: float | None = None
                     ) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it came from or why it is missing)."""
  return _lookup(PEAK_BF16_FLOPS_PER_S, device_kind, override, 'peak_flops_per_s',
                 'peak FLOP/s', 'dense bf16 datasheet')


# Datasheet memory (HBM) bandwidth per device, the denominator of memory-bandwidth utilisation
# (MBU) in decoding. Decimal units (1 TB/s = 1e12 bytes/s), as the datasheets give them. Same
# matching as the FLOP table: substring of `device.device_kind`, most specific first ('GH200'
# contains 'H200'; 'H100 NVL' contains 'H100').
# Sources: NVIDIA's GH200 Grace Hopper Superchip datasheet (96 GB HBM3: 4 TB/s; 144 GB HBM3e:
# 4.9 TB/s); H200 product page/datasheet (SXM and NVL: 4.8 TB/s); H100 datasheet (SXM 3.35 TB/s,
# PCIe 2 TB/s, NVL 3.9 TB/s); A100 datasheet (80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB
# 1,555 GB/s); Google Cloud TPU system-architecture pages (v4 1,200 GBps, v5e 819 GBps, v5p
# 2,765 GBps, v6e 1,638 GBps).
PEAK_MEMORY_BANDWIDTH_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    # jax reports the HBM3e superchip as 'NVIDIA GH200 144G HBM3e', the HBM3 one as
    # 'NVIDIA GH200 480GB' (480 GB of Grace LPDDR5X beside 96 GB HBM3) or 'NVIDIA GH200 120GB'.
    ('GH200 144G', 4.9e12),
    ('GH200', 4.0e12),
    ('H200 NVL', 4.8e12),
    ('H200', 4.8e12),
    ('H100 PCIe', 2.0e12),
    ('H100 NVL', 3.9e12),
    ('H100', 3.35e12),          # SXM5, 'NVIDIA H100 80GB HBM3'
    ('A100 80GB PCIe', 1.935e12),
    ('A100-PCIE-80GB', 1.935e12),
    ('A100-SXM4-80GB', 2.039e12),
    ('A100-SXM-80GB', 2.039e12),
    ('A100-SXM4-40GB', 1.555e12),
    ('A100-PCIE-40GB', 1.555e12),
    ('TPU v6 lite', 1.638e12),  # v6e (Trillium)
    ('TPU v6e', 1.638e12),
    ('TPU v5 lite', 0.819e12),  # v5e
    ('TPU v5e', 0.819e12),
    ('TPU v5p', 2.765e12),
    ('TPU v5', 2.765e12),       # v5p reports 'TPU v5'
    ('TPU v4', 1.2e12),
)


def peak_bandwidth_bytes_per_s(device_kind: str, override: float | None = None
                               ) -> tuple[float | None, str]:
  """(peak memory bandwidth per device in bytes/s, where it came from or why it is missing)."""
  return _lookup(PEAK_MEMORY_BANDWIDTH_BYTES_PER_S, device_kind, override,
                 'peak_bandwidth_bytes_per_s', 'peak memory bandwidth', 'HBM bandwidth datasheet')
