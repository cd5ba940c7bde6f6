"""Peak dense bf16 FLOP/s per device, the denominator of MFU.

Datasheet figures without structured sparsity. Matched by substring of `device.device_kind`,
most specific first (an 'H100 PCIe' must not match the SXM entry).
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


def peak_flops_per_s(device_kind: str, override: float | None = None
                     ) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it came from or why it is missing)."""
  if override:
    return float(override), 'config: metrics.peak_flops_per_s'
  for key, peak in PEAK_BF16_FLOPS_PER_S:
    if key.lower() in device_kind.lower():
      return peak, f'table: {key} (dense bf16 datasheet)'
  return None, (f'no peak FLOP/s known for device kind {device_kind!r}; set '
                '--config.metrics.peak_flops_per_s')
