"""The record's `metrics` section, each number against docs/metrics.md's definition by hand.

A `TrainResult` is built by hand from round numbers, and every derived value of
`training_metrics` is compared with the same number computed here from the documented formula
(not from the code's own intermediate values). What this proves:
- every rate, average and per-token energy is over the measurement window alone: a huge
  compile time, the pauses, the warm-up and profiled steps outside the window change none of
  them (a bug that widens or narrows the window changes the expected values below);
- MFU divides by the peak of all devices (peak x device count), with the H100 SXM peak written
  here, not read from peaks.py;
- step_ms is mean / percentiles (linear interpolation) / population std of known durations;
- what cannot be measured is null beside a reason: no measured steps, a run resumed at its
  final step, a device kind without a peak; a configured peak replaces the table;
- the assembled record, as experiments/pretrain.py assembles it, passes record_schema.json.
"""

import json
import math

import pytest

from efficientjax.metrics import record as records
from efficientjax.metrics.report import training_metrics
from efficientjax.metrics.window import MeasurementWindow
from efficientjax.model import ModelConfig
from efficientjax.train.loop import TrainResult
from tests.metrics.test_sampling import FakeClock, FakeMeter

# --- the hand-built run ---------------------------------------------------------------------

BATCH, SEQ_LEN = 8, 512               # global batch x sequence length: 4096 tokens a step
WINDOW_S, WINDOW_STEPS = 2.0, 10      # pauses already subtracted (MeasurementWindow.seconds)
PAUSED_S = 0.5
# Huge on purpose: a compile time leaking into any rate moves it by orders of magnitude.
COMPILE_S = 1000.0
# Warm-up (3) and profiled (2) steps ran before the window: 15 steps in all, 10 measured.
START_STEP, FINAL_STEP = 0, 15
NUM_PARAMS, WEIGHT_BYTES = 1_000_000, 2_000_000  # bf16 weights
DEVICE_KIND, DEVICE_COUNT = 'NVIDIA H100 80GB HBM3', 2
H100_SXM_PEAK = 989.4e12              # dense bf16 datasheet, per device
ANALYTIC = {'matmul': 9.0e13, 'attention': 1.0e13, 'attention_as_executed': 2.0e13,
            'total': 1.0e14}
COMPILER_FLOPS = 1.12e14
# Step durations 155, 165, ..., 245 ms: mean 200 ms, and they add up to the 2 s window.
STEP_MS = [155.0 + 10.0 * i for i in range(10)]
ENERGY = {'source': 'nvml', 'scope': 'gpu', 'energy_j': 1400.0,
          'energy_j_per_device': [800.0, 600.0], 'avg_power_w': 700.0,
          'counter_update_period_s': 0.1, 'reliable': True, 'reason': None}
SAMPLER = {
    'interval_s': 0.1, 'samples': 21, 'duration_s': 2.0, 'overhead_s': 0.004,
    'devices': [
        {'id': 0, 'kind': DEVICE_KIND, 'bytes_in_use_mean': 3.0e10, 'bytes_in_use_peak': 3.5e10,
         'bytes_limit': 6.0e10, 'amu': 0.5},
        {'id': 1, 'kind': DEVICE_KIND, 'bytes_in_use_mean': 3.0e10, 'bytes_in_use_peak': 3.5e10,
         'bytes_limit': 6.0e10, 'amu': 0.5}],
    'bytes_in_use_mean': 6.0e10, 'bytes_in_use_peak': 7.0e10, 'bytes_limit': 1.2e11,
    'amu': 0.5, 'host_rss_bytes_mean': 4.0e9, 'host_rss_bytes_peak': 4.5e9,
    'power_w_mean': 690.0, 'power_w_peak': 720.0, 'utilization_pct_mean': 97.5,
    'reason': None,
}
MEMORY_ANALYSIS = {'argument_bytes': 10, 'output_bytes': 10, 'temp_bytes': 5, 'alias_bytes': 10}
NO_TRACE = {'available': False, 'reason': 'profile.steps = 0: no trace taken'}


def _result(**overrides) -> TrainResult:
  fields = dict(
      model_config=ModelConfig(vocab_size=16, embed_dim=8, num_layers=1, num_heads=2,
                               num_kv_heads=2, head_dim=4, mlp_dim=16),
      mesh_shape={'data': 1, 'fsdp': 2, 'tensor': 1, 'expert': 1},
      num_params=NUM_PARAMS, weight_bytes=WEIGHT_BYTES,
      start_step=START_STEP, final_step=FINAL_STEP,
      losses={s: 5.0 - 0.1 * s for s in range(START_STEP + 1, FINAL_STEP + 1)},
      step_times_s=[ms / 1e3 for ms in STEP_MS],
      tokens_per_step=BATCH * SEQ_LEN, samples_per_step=BATCH,
      compile_s=COMPILE_S, initial_eval_loss=5.5, eval_losses={FINAL_STEP: 3.5},
      data_stats={'synthetic': True}, checkpoint_dir=None, attention_impl='xla',
      attention={}, moe=None,
      device_kind=DEVICE_KIND, device_count=DEVICE_COUNT,
      analytic_flops=dict(ANALYTIC), compiler_flops=COMPILER_FLOPS,
      compiler_flops_reason=None, compiled_step_flops=3.0e13,
      memory_analysis=dict(MEMORY_ANALYSIS),
      window_s=WINDOW_S, window_steps=WINDOW_STEPS, paused_s=PAUSED_S,
      energy=dict(ENERGY), sampler=dict(SAMPLER), trace=dict(NO_TRACE),
  )
  fields.update(overrides)
  return TrainResult(**fields)


def _record(result: TrainResult, metrics) -> dict:
  """The record as experiments/pretrain.py assembles it (env by hand: no git, no devices)."""
  record = records.new_record('pretrain', {'train': {'steps': result.final_step}})
  record.update({
      'env': {'python': '3.12', 'jax': '0', 'jaxlib': '0', 'flax': '0', 'optax': '0',
              'backend': 'gpu', 'device_kind': result.device_kind,
              'device_count': result.device_count, 'local_device_count': result.device_count,
              'process_count': 1, 'mesh_shape': result.mesh_shape, 'hostname': 'h',
              'git_commit': None},
      'model': {'params': result.num_params, 'weight_bytes': result.weight_bytes},
      'steps': {'start': result.start_step, 'final': result.final_step,
                'tokens_per_step': result.tokens_per_step, 'skipped': 0, 'skipped_at': []},
      'quality': {'train_loss': 3.6, 'eval_loss': 3.5, 'eval_perplexity': math.exp(3.5),
                  'initial_eval_loss': 5.5, 'initial_eval_perplexity': math.exp(5.5)},
      'metrics': metrics,
  })
  return record


def _metrics(result: TrainResult, **kwargs):
  m = training_metrics(result, **kwargs)
  assert set(m) == {'memory', 'compute', 'latency', 'throughput', 'energy', 'compression',
                    'trace'}  # seven groups, always
  for group in m.values():
    assert 'reason' in group or 'available' in group
  record = _record(result, m)
  json.dumps(record, allow_nan=False)  # strict JSON, as write_record writes it
  records.validate_record(record)
  return m


def approx(x):
  return pytest.approx(x, rel=1e-12, abs=0.0)


# --- every number of a measured run ---------------------------------------------------------


def test_throughput_is_the_windows_tokens_over_the_windows_seconds():
  t = _metrics(_result())['throughput']
  # global_batch x seq_len x window_steps / window_s = 8 x 512 x 10 / 2 s
  assert t['tokens_per_s'] == approx(20480.0)
  assert t['samples_per_s'] == approx(40.0)                 # 8 x 10 / 2 s
  assert t['tokens_per_param_per_s'] == approx(0.02048)     # 20480 / 1e6 params
  assert t['reason'] is None


def test_compute_achieved_flops_and_mfu_over_all_devices():
  c = _metrics(_result())['compute']
  assert c['analytic_flops_per_step'] == ANALYTIC
  assert c['compiler_flops_per_step'] == COMPILER_FLOPS
  assert c['compiled_step_flops_raw'] == 3.0e13
  assert c['compiler_flops_reason'] is None
  # FLOPs per step x window steps / window s.
  assert c['achieved_flops_per_s_analytic'] == approx(5.0e14)   # 1e14 x 10 / 2
  assert c['achieved_flops_per_s_compiler'] == approx(5.6e14)   # 1.12e14 x 10 / 2
  assert c['peak_flops_per_s_per_device'] == H100_SXM_PEAK
  assert c['peak_source'].startswith('table: H100 ')
  # achieved / (peak x device count): two H100s offer 1.9788e15 FLOP/s.
  assert c['mfu_analytic'] == approx(5.0e14 / 1.9788e15)
  assert c['mfu_compiler'] == approx(5.6e14 / 1.9788e15)
  assert 0.25 < c['mfu_analytic'] < 0.26  # 25.3%: what a reader of the record would see
  assert c['nvml_utilization_pct_mean'] == 97.5
  assert c['device_busy_fraction'] is None  # no trace taken
  assert c['reason'] is None


def test_latency_step_ms_by_hand_and_the_window_as_measured():
  lat = _metrics(_result())['latency']
  assert (lat['window_s'], lat['window_steps'], lat['paused_s'], lat['compile_s']) == (
      WINDOW_S, WINDOW_STEPS, PAUSED_S, COMPILE_S)
  assert lat['reason'] is None
  # 155 .. 245 ms in steps of 10. Percentiles interpolate linearly between order statistics
  # (rank q/100 x (n - 1) from 0): p50 at rank 4.5 = (195 + 205) / 2; p90 at rank 8.1 =
  # 235 + 0.1 x 10; p99 at rank 8.91 = 235 + 0.91 x 10. The std is the population one:
  # 10 x sqrt((n^2 - 1) / 12) for n equally spaced values 10 apart.
  step = lat['step_ms']
  assert step['count'] == 10
  assert step['mean'] == approx(200.0)
  assert step['p50'] == approx(200.0)
  assert step['p90'] == approx(236.0)
  assert step['p99'] == approx(244.1)
  assert step['std'] == approx(10.0 * math.sqrt(99 / 12))


def test_energy_per_token_and_sample_over_the_window():
  e = _metrics(_result())['energy']
  # The window's meter readings pass through unchanged ...
  for key, value in ENERGY.items():
    assert e[key] == value, key
  assert e['avg_power_w'] == approx(1400.0 / WINDOW_S)  # energy_j / window_s
  # ... and per token / sample divide by the window's 40960 tokens / 80 sequences, not by the
  # 15 steps the run took (61440 tokens).
  assert e['joules_per_token'] == approx(1400.0 / 40960)
  assert e['joules_per_sample'] == approx(17.5)
  assert e['avg_power_w_sampled'] == 690.0


def test_memory_and_compression():
  m = _metrics(_result())
  mem = m['memory']
  for key in ('bytes_in_use_mean', 'bytes_in_use_peak', 'bytes_limit', 'amu',
              'host_rss_bytes_mean', 'host_rss_bytes_peak', 'samples'):
    assert mem[key] == SAMPLER[key], key
  assert mem['amu'] == mem['bytes_in_use_mean'] / mem['bytes_limit']
  assert mem['per_device'] == SAMPLER['devices']
  assert mem['sample_interval_s'] == 0.1 and mem['sampler_overhead_s'] == 0.004
  assert mem['compiler_estimate_bytes'] == MEMORY_ANALYSIS
  assert mem['reason'] is None
  comp = m['compression']
  assert comp['weight_bytes'] == WEIGHT_BYTES
  assert comp['weight_bytes_per_param'] == 2.0  # bf16
  # Nothing to compare with in a pretraining run: null, and the reason says so.
  assert (comp['baseline_weight_bytes'], comp['size_ratio'], comp['quality_ratio'],
          comp['mcr']) == (None, None, None, None)
  assert 'compresses nothing' in comp['reason']


_RATES = (('throughput', 'tokens_per_s'), ('throughput', 'samples_per_s'),
          ('throughput', 'tokens_per_param_per_s'), ('compute', 'achieved_flops_per_s_analytic'),
          ('compute', 'achieved_flops_per_s_compiler'), ('compute', 'mfu_analytic'),
          ('compute', 'mfu_compiler'), ('energy', 'joules_per_token'),
          ('energy', 'joules_per_sample'), ('energy', 'avg_power_w'))


@pytest.mark.parametrize('outside', [
    {'compile_s': 0.001}, {'compile_s': 5.0e4}, {'paused_s': 0.0}, {'paused_s': 300.0},
    {'start_step': 5, 'final_step': 40}, {'final_step': 10},
], ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_nothing_outside_the_window_moves_a_rate(outside):
  """Compilation, pauses and the steps before the window are not in any rate."""
  base, other = _metrics(_result()), _metrics(_result(**outside))
  for group, key in _RATES:
    assert other[group][key] == base[group][key], (group, key)


def test_window_and_report_together_leave_out_compilation_and_evaluation():
  """The path of a real run on a fake clock and counters: compile 1000 s, warm up, open the
  window, 2 s of steps around a 30 s evaluation, close. Every joule and second of compilation,
  warm-up and evaluation is left out."""
  clock = FakeClock(0.0)
  meter = FakeMeter(energy_j=lambda: [400.0 * clock.t, 300.0 * clock.t])  # 700 W throughout
  window = MeasurementWindow(meter, clock=clock)
  clock.t = COMPILE_S + 3.0     # compiled, then three warm-up steps
  window.open()
  clock.t += 1.2                # six steps
  window.pause()
  clock.t += 30.0               # evaluation
  window.resume()
  clock.t += 0.8                # four steps
  window.close()
  m = _metrics(_result(window_s=window.seconds, window_steps=10, paused_s=window.paused_s,
                       energy=window.energy()))
  assert m['latency']['window_s'] == approx(2.0)
  assert m['latency']['paused_s'] == approx(30.0)
  assert m['energy']['energy_j_per_device'] == [approx(800.0), approx(600.0)]
  assert m['energy']['energy_j'] == approx(1400.0)
  assert m['energy']['avg_power_w'] == approx(700.0)
  assert m['energy']['joules_per_token'] == approx(1400.0 / 40960)
  assert m['throughput']['tokens_per_s'] == approx(20480.0)
  assert m['compute']['mfu_analytic'] == approx(5.0e14 / 1.9788e15)


def test_a_trace_gives_the_device_busy_fraction():
  trace = {'available': True, 'source': 'device', 'trace_path': '/tmp/t.xplane.pb',
           'window_ms': 400.0, 'busy_ms': 300.0, 'busy_fraction': 0.75, 'idle_ms': 100.0,
           'categories_ms': {'attention': 50.0, 'matmul': 200.0, 'moe_dispatch': 0.0,
                             'collective': 25.0, 'other': 25.0},
           'categories_share': {'attention': 1 / 6, 'matmul': 2 / 3, 'moe_dispatch': 0.0,
                                'collective': 1 / 12, 'other': 1 / 12}}
  m = _metrics(_result(trace=trace))
  assert m['compute']['device_busy_fraction'] == 0.75
  assert m['trace'] == trace
  # Unavailable: no fraction, whatever stale number the dict holds.
  m = _metrics(_result(trace={'available': False, 'reason': 'x', 'busy_fraction': 0.5}))
  assert m['compute']['device_busy_fraction'] is None


# --- null, with the reason ------------------------------------------------------------------


def _assert_rates_null(m):
  for group, key in _RATES:
    if group != 'energy' or key != 'avg_power_w':  # the meter's own (checked by the caller)
      assert m[group][key] is None, (group, key)


def test_no_measured_steps_gives_nulls_with_the_reason():
  # A run of 3 steps with 2 warm-up and 2 profiled steps: the window never opened.
  never = MeasurementWindow(FakeMeter(energy_j=lambda: [0.0, 0.0]), clock=FakeClock())
  m = _metrics(_result(final_step=3, window_s=never.seconds, window_steps=never.steps,
                       paused_s=0.0, step_times_s=[], energy=never.energy()))
  _assert_rates_null(m)
  reason = m['latency']['reason']
  assert 'no measured steps' in reason and 'timing_warmup_steps' in reason
  assert m['throughput']['reason'] == m['compute']['reason'] == reason
  assert m['latency']['step_ms'] == {'mean': None, 'p50': None, 'p90': None, 'p99': None,
                                     'std': None, 'count': 0}
  assert m['energy']['energy_j'] is None and m['energy']['reason']
  # The peak is still known: only the measurement is missing.
  assert m['compute']['peak_flops_per_s_per_device'] == H100_SXM_PEAK


def test_window_with_energy_but_no_steps_says_why_energy_per_token_is_null():
  # Energy read but no step measured: the per-token figures are null, and the energy group
  # (whose own reason is None, the meter having worked) must say why.
  m = _metrics(_result(window_s=None, window_steps=0, step_times_s=[], final_step=3))
  assert m['energy']['energy_j'] == 1400.0
  assert m['energy']['joules_per_token'] is None and m['energy']['joules_per_sample'] is None
  assert 'no measured steps' in m['energy']['reason']


def test_resumed_at_the_final_step_says_so():
  m = _metrics(_result(start_step=100, final_step=100, window_s=None, window_steps=0,
                       paused_s=0.0, step_times_s=[]))
  _assert_rates_null(m)
  for group in ('latency', 'throughput', 'compute'):
    assert 'resumed at the final step' in m[group]['reason'], group


def test_unknown_device_kind_has_no_peak_and_no_mfu():
  m = _metrics(_result(device_kind='cpu'))
  c = m['compute']
  assert c['peak_flops_per_s_per_device'] is None
  assert c['mfu_analytic'] is None and c['mfu_compiler'] is None
  assert c['achieved_flops_per_s_analytic'] == approx(5.0e14)  # measured all the same
  assert "device kind 'cpu'" in c['reason'] and 'metrics.peak_flops_per_s' in c['reason']
  assert c['peak_source'] == c['reason']
  assert m['throughput']['tokens_per_s'] == approx(20480.0)


@pytest.mark.parametrize('kind', ['cpu', DEVICE_KIND])
def test_configured_peak_replaces_the_table(kind):
  c = _metrics(_result(device_kind=kind), peak_override=4.0e14)['compute']
  assert c['peak_flops_per_s_per_device'] == 4.0e14
  assert c['peak_source'] == 'config: metrics.peak_flops_per_s'
  assert c['mfu_analytic'] == approx(5.0e14 / 8.0e14)    # 2 devices x 4e14
  assert c['mfu_compiler'] == approx(5.6e14 / 8.0e14)
  assert c['reason'] is None


def test_no_compiler_count_leaves_only_its_side_null():
  c = _metrics(_result(compiler_flops=None,
                       compiler_flops_reason='XLA gave no cost analysis'))['compute']
  assert c['compiler_flops_per_step'] is None
  assert c['achieved_flops_per_s_compiler'] is None and c['mfu_compiler'] is None
  assert c['compiler_flops_reason'] == 'XLA gave no cost analysis'
  assert c['mfu_analytic'] == approx(5.0e14 / 1.9788e15)


def test_schema_refuses_what_the_docs_forbid():
  """The schema is a guard, not a formality: a record breaking a documented rule fails it."""
  import jsonschema  # pylint: disable=g-import-not-at-top
  good = _record(_result(), training_metrics(_result()))
  records.validate_record(good)

  def broken(change):
    bad = json.loads(json.dumps(good))
    change(bad['metrics'])
    with pytest.raises(jsonschema.ValidationError):
      records.validate_record(bad)

  broken(lambda m: m.pop('energy'))                                    # a group missing
  broken(lambda m: m['energy'].update(energy_j=None, reason=None))     # null without reason
  broken(lambda m: m['memory'].update(amu=1.5))                        # a fraction above 1
  broken(lambda m: m['latency']['step_ms'].pop('p99'))
  broken(lambda m: m['throughput'].update(tokens_per_s=0.0))           # no rate of zero
  broken(lambda m: m['energy'].update(reliable=None))
  broken(lambda m: m['trace'].pop('reason'))                           # unavailable, no why
