"""Latency summaries and MLPerf's TTFT / TPOT / e2e, against numbers computed by hand."""

import pytest

from efficientjax.metrics import latency
from efficientjax.metrics.latency import RequestTimes

EMPTY = {'p50': None, 'p90': None, 'p99': None, 'mean': None, 'max': None, 'std': None,
         'count': 0}


def _no_std(summary):
  return {k: v for k, v in summary.items() if k != 'std'}


def test_summary_percentiles_interpolate_linearly():
  # Sorted [1, 2, 3, 4] ms: percentile q sits at rank q/100 * 3, between its neighbours.
  got = latency.summary([0.004, 0.001, 0.003, 0.002])
  assert got['std'] == pytest.approx(1.25 ** 0.5)  # population std of [1, 2, 3, 4] ms
  assert _no_std(got) == pytest.approx({'p50': 2.5, 'p90': 3.7, 'p99': 3.97, 'mean': 2.5,
                               'max': 4.0, 'count': 4})
  assert _no_std(latency.summary([0.5])) == pytest.approx({'p50': 500.0, 'p90': 500.0,
                                                  'p99': 500.0, 'mean': 500.0,
                                                  'max': 500.0, 'count': 1})


def test_summary_of_nothing_is_none_and_undefined_values_are_left_out():
  assert latency.summary([]) == EMPTY
  assert latency.summary(None) == EMPTY
  assert latency.summary([None, None]) == EMPTY
  assert _no_std(latency.summary(iter([None, 0.01, None]))) == pytest.approx(
      {'p50': 10.0, 'p90': 10.0, 'p99': 10.0, 'mean': 10.0, 'max': 10.0,
       'count': 1})


def test_mlperf_definitions_by_hand():
  r = RequestTimes(arrival_s=1.0, token_s=[1.25, 1.35, 1.5, 1.6], finish_s=1.7)
  assert r.ttft_s == pytest.approx(0.25)
  assert r.tpot_s == pytest.approx((1.7 - 1.25) / 3)  # 3 tokens after the first
  assert r.e2e_s == pytest.approx(0.7)
  assert r.inter_token_s == pytest.approx([0.1, 0.15, 0.1])
  # Without a finish time the last token ends the request.
  r = RequestTimes(arrival_s=1.0, token_s=[1.25, 1.35, 1.5, 1.6])
  assert r.tpot_s == pytest.approx(0.35 / 3) and r.e2e_s == pytest.approx(0.6)
  # One token: TPOT undefined; none: TTFT too.
  one = RequestTimes(arrival_s=2.0, token_s=[2.5], finish_s=2.6)
  assert one.ttft_s == pytest.approx(0.5) and one.tpot_s is None
  assert one.e2e_s == pytest.approx(0.6) and one.inter_token_s == []
  none = RequestTimes(arrival_s=2.0, token_s=[], finish_s=2.1)
  assert none.ttft_s is None and none.tpot_s is None and none.e2e_s == pytest.approx(0.1)
  assert latency.tpot_s(1.0, 2.0, 1) is None
  assert latency.tpot_s(1.0, 2.0, 5) == pytest.approx(0.25)
  assert latency.ttft_s(3.0, 3.5) == 0.5 and latency.e2e_s(3.0, 4.5) == 1.5


def test_request_latencies_summarise_over_requests():
  requests = [
      RequestTimes(0.0, [0.1, 0.2, 0.3]),          # ttft 0.1, tpot 0.1, e2e 0.3
      RequestTimes(1.0, [1.2], finish_s=1.25),      # ttft 0.2, tpot -,   e2e 0.25
      RequestTimes(2.0, [2.4, 2.6], finish_s=2.6),  # ttft 0.4, tpot 0.2, e2e 0.6
  ]
  got = latency.request_latencies(requests)
  # TTFT [100, 200, 400] ms: p90 at rank 1.8 = 200 + 0.8 * 200.
  assert _no_std(got['ttft_ms']) == pytest.approx({'p50': 200.0, 'p90': 360.0, 'p99': 396.0,
                                       'mean': 700 / 3, 'max': 400.0, 'count': 3})
  # TPOT over the two requests with >= 2 tokens: [100, 200] ms.
  assert _no_std(got['tpot_ms']) == pytest.approx({'p50': 150.0, 'p90': 190.0, 'p99': 199.0,
                                       'mean': 150.0, 'max': 200.0, 'count': 2})
  # e2e [250, 300, 600] ms.
  assert _no_std(got['e2e_ms']) == pytest.approx({'p50': 300.0, 'p90': 540.0, 'p99': 594.0,
                                      'mean': 1150 / 3, 'max': 600.0, 'count': 3})
  # Gaps pooled: [100, 100, 200] ms.
  assert _no_std(got['itl_ms']) == pytest.approx({'p50': 100.0, 'p90': 180.0, 'p99': 198.0,
                                      'mean': 400 / 3, 'max': 200.0, 'count': 3})
  assert latency.request_latencies([]) == {'ttft_ms': EMPTY, 'tpot_ms': EMPTY, 'e2e_ms': EMPTY,
                                           'itl_ms': EMPTY}
