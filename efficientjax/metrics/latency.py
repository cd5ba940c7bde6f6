"""Latency summaries and MLPerf Inference's per-request latencies of an LLM server.

Per request, from its timestamps (arrival, each output token, finish), as MLPerf's LLM
benchmarks define them:
    TTFT  time to first token      first_token - arrival
    TPOT  time per output token    (finish - first_token) / (n_out - 1); undefined for n_out < 2
    e2e   end-to-end latency       finish - arrival
and, beside them, the inter-token latencies (the gaps between consecutive tokens, pooled over
requests). A run reports each as `summary`: percentiles over requests (over gaps for ITL) by
numpy's default linear interpolation (`np.percentile(..., method='linear')`), mean, standard
deviation and max.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any


from efficientjax.metrics.timing import summarize_ms


def summary(values_s: Iterable[float | None] | None) -> dict[str, float | int | None]:
  """`timing.summarize_ms` of durations in seconds (mean, p50, p90, p99, std in ms, and the
  count: the shape of every latency in a record), plus `max`. None entries (undefined values,
  e.g. the TPOT of a one-token request) are left out; with none left every statistic is None
  and count 0."""
  kept = [float(v) for v in (values_s or ()) if v is not None]
  return {**summarize_ms(kept), 'max': max(kept) * 1e3 if kept else None}


def ttft_s(arrival_s: float, first_token_s: float) -> float:
  """Time to first token."""
  return first_token_s - arrival_s


def tpot_s(first_token_s: float, finish_s: float, n_out: int) -> float | None:
  """Time per output token after the first; None when fewer than 2 tokens came out."""
  if n_out < 2:
    return None
  return (finish_s - first_token_s) / (n_out - 1)


def e2e_s(arrival_s: float, finish_s: float) -> float:
  """End-to-end latency."""
  return finish_s - arrival_s


@dataclasses.dataclass(frozen=True)
class RequestTimes:
  """One request's timestamps in seconds on one clock: its arrival, the time each output token
  became available (in order), and its finish (None: its last token's time)."""

  arrival_s: float
  token_s: Sequence[float]
  finish_s: float | None = None

  @property
  def n_out(self) -> int:
    return len(self.token_s)

  @property
  def end_s(self) -> float | None:
    if self.finish_s is not None:
      return self.finish_s
    return self.token_s[-1] if self.token_s else None

  @property
  def ttft_s(self) -> float | None:
    return ttft_s(self.arrival_s, self.token_s[0]) if self.token_s else None

  @property
  def tpot_s(self) -> float | None:
    return tpot_s(self.token_s[0], self.end_s, self.n_out) if self.token_s else None

  @property
  def e2e_s(self) -> float | None:
    return e2e_s(self.arrival_s, self.end_s) if self.end_s is not None else None

  @property
  def inter_token_s(self) -> list[float]:
    return [b - a for a, b in zip(self.token_s[:-1], self.token_s[1:])]


def request_latencies(requests: Sequence[RequestTimes]) -> dict[str, Any]:
  """{'ttft_ms', 'tpot_ms', 'e2e_ms', 'itl_ms'}: the `summary` of each over `requests`."""
  return {
      'ttft_ms': summary(r.ttft_s for r in requests),
      'tpot_ms': summary(r.tpot_s for r in requests),
      'e2e_ms': summary(r.e2e_s for r in requests),
      'itl_ms': summary(gap for r in requests for gap in r.inter_token_s),
  }
