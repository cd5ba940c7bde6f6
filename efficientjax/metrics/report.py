"""The `metrics` section of a training record, from what the loop measured.

Seven groups, always present: memory, compute, latency, throughput, energy, compression,
trace. A value that could not be measured is null beside a `reason`; units are in the names.
docs/metrics.md defines every field.
"""

from typing import Any

from efficientjax.metrics.peaks import peak_flops_per_s
from efficientjax.metrics.timing import summarize_ms


def _rate(amount: float | None, seconds: float | None) -> float | None:
  return amount / seconds if amount is not None and seconds else None


def _no_window_reason(result) -> str | None:
  if result.window_s:
    return None
  if result.start_step >= result.final_step:
    return ('no steps ran in this process: it resumed at the final step (the process that '
            'trained it ended before writing the record), so its timings were lost')
  return ('no measured steps: the run was shorter than train.timing_warmup_steps + '
          'profile.steps; run more steps')


def training_metrics(result, *, peak_override: float | None = None) -> dict[str, Any]:
  """result: an efficientjax.train.loop.TrainResult."""
  window_s, n = result.window_s, result.window_steps
  missing = _no_window_reason(result)
  tokens = result.tokens_per_step * n
  # Examples as counted in the measured steps (several per packed fine-tuning row), or rows.
  samples = (result.window_samples if getattr(result, 'window_samples', None) is not None
             else result.samples_per_step * n)

  latency = {'step_ms': summarize_ms(result.step_times_s), 'compile_s': result.compile_s,
             'window_s': window_s, 'window_steps': n, 'paused_s': result.paused_s,
             'reason': missing}

  tokens_per_s = _rate(tokens, window_s) if n else None
  samples_per_s = _rate(samples, window_s) if n else None
  throughput = {
      'tokens_per_s': tokens_per_s,
      'samples_per_s': samples_per_s,
      # EfficientLLM's normalisation: throughput per model parameter.
      'tokens_per_param_per_s': tokens_per_s / result.num_params if tokens_per_s else None,
      'samples_per_param_per_s': samples_per_s / result.num_params if samples_per_s else None,
      'reason': missing,
  }

  peak, peak_source = peak_flops_per_s(result.device_kind, peak_override)
  analytic = result.analytic_flops
  achieved_analytic = _rate(analytic.get('total', 0.0) * n, window_s) if n else None
  achieved_compiler = (_rate(result.compiler_flops * n, window_s)
                       if n and result.compiler_flops is not None else None)
  total_peak = peak * result.device_count if peak else None
  busy = result.trace.get('busy_fraction') if result.trace.get('available') else None
  compute = {
      'analytic_flops_per_step': analytic,
      'compiler_flops_per_step': result.compiler_flops,
      'compiler_flops_source': 'XLA cost analysis of the step lowered with unrolled layers and '
                               'XLA attention (see docs/metrics.md)',
      'compiler_flops_reason': result.compiler_flops_reason,
      'compiled_step_flops_raw': result.compiled_step_flops,
      'achieved_flops_per_s_analytic': achieved_analytic,
      'achieved_flops_per_s_compiler': achieved_compiler,
      'peak_flops_per_s_per_device': peak,
      'peak_source': peak_source,
      'mfu_analytic': achieved_analytic / total_peak if achieved_analytic and total_peak else None,
      'mfu_compiler': achieved_compiler / total_peak if achieved_compiler and total_peak else None,
      'nvml_utilization_pct_mean': result.sampler.get('utilization_pct_mean'),
      'device_busy_fraction': busy,
      'reason': missing or (None if peak else peak_source),
  }

  s = result.sampler
  memory = {
      'bytes_in_use_mean': s.get('bytes_in_use_mean'),
      'bytes_in_use_peak': s.get('bytes_in_use_peak'),
      'bytes_limit': s.get('bytes_limit'),
      'amu': s.get('amu'),
      'per_device': s.get('devices'),
      'host_rss_bytes_mean': s.get('host_rss_bytes_mean'),
      'host_rss_bytes_peak': s.get('host_rss_bytes_peak'),
      'samples': s.get('samples'),
      'sample_interval_s': s.get('interval_s'),
      'sampler_overhead_s': s.get('overhead_s'),
      'compiler_estimate_bytes': result.memory_analysis or None,
      'reason': s.get('reason'),
  }

  e = dict(result.energy)
  energy_j = e.get('energy_j')
  energy = {
      **e,
      'avg_power_w_sampled': s.get('power_w_mean'),
      'joules_per_token': energy_j / tokens if energy_j is not None and tokens else None,
      'joules_per_sample': energy_j / samples if energy_j is not None and samples else None,
  }
  if energy_j is not None and not n:
    energy['reason'] = missing

  compression = {
      'weight_bytes': result.weight_bytes,
      'weight_bytes_per_param': result.weight_bytes / result.num_params,
      'baseline_weight_bytes': None,
      'size_ratio': None,
      'quality_ratio': None,
      'mcr': None,
      'reason': 'a pretraining run compresses nothing; MCR is filled when a quantised or pruned '
                'variant is compared with its base',
  }

  return {'memory': memory, 'compute': compute, 'latency': latency, 'throughput': throughput,
          'energy': energy, 'compression': compression, 'trace': dict(result.trace)}
