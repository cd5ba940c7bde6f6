"""Summaries of measured durations."""

from collections.abc import Sequence

import numpy as np


def summarize_ms(durations_s: Sequence[float]) -> dict[str, float | int | None]:
  """Mean, spread and percentiles in milliseconds of synced wall-clock durations."""
  if not durations_s:
    return {'mean': None, 'p50': None, 'p90': None, 'p99': None, 'std': None, 'count': 0}
  ms = np.asarray(durations_s, np.float64) * 1e3
  p50, p90, p99 = np.percentile(ms, [50, 90, 99])
  return {'mean': float(ms.mean()), 'p50': float(p50), 'p90': float(p90), 'p99': float(p99),
          'std': float(ms.std()), 'count': int(ms.size)}
