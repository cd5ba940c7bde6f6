"""The `metrics` section of a training record, from what the loop measured.

Seven groups, always present: memory, compute, latency, throughput, energy, compression,
trace. A value that could not be measured is null beside a `reason`; units are in the names.
docs/metrics.md defines every field.
"""

from typing import Any

import numpy as np

from efficientjax.metrics import latency as latency_lib
from efficientjax.metrics.peaks import peak_bandwidth_bytes_per_s, peak_flops_per_s
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


def _memory(s: dict[str, Any], **extra: Any) -> dict[str, Any]:
  """The memory group from the sampler's summary `s`, with the kind's own fields."""
  return {
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
      **extra,
      'reason': s.get('reason'),
  }


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
  memory = _memory(s, compiler_estimate_bytes=result.memory_analysis or None,
                   plan=result.memory_plan or None)

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


def inference_metrics(result, *, peak_override: float | None = None,
                      bandwidth_override: float | None = None) -> dict[str, Any]:
  """The `metrics` section of an inference record. result: efficientjax.infer.run's
  InferenceResult. MLPerf Inference's definitions (docs/metrics.md): TTFT from arrival to the
  first token on the host, TPOT over the tokens after the first, end-to-end to the last."""
  done, stats, window_s = result.completions, result.stats, result.window_s
  output_tokens = sum(len(c.tokens) for c in done)
  prompt_tokens = sum(c.prompt_len for c in done)
  missing = None if window_s else 'the measurement window did not open and close'

  latency = {
      **latency_lib.request_latencies(
          [latency_lib.RequestTimes(c.arrival_s, c.token_s) for c in done]),
      'decode_step_ms': summarize_ms(stats.decode_step_s),
      'prefill_ms': summarize_ms(stats.prefill_s),
      'compile_s': stats.compile_s, 'window_s': window_s, 'reason': missing,
  }
  tokens_per_s = _rate(output_tokens, window_s)
  throughput = {
      'output_tokens_per_s': tokens_per_s,   # the paper's IT
      'requests_per_s': _rate(len(done), window_s),
      'prompt_tokens_per_s': _rate(prompt_tokens, window_s),
      # While prefilling: prompt tokens over the prefill calls' own time.
      'prefill_tokens_per_s': _rate(stats.prefill_tokens, sum(stats.prefill_s)),
      'output_tokens_per_param_per_s': tokens_per_s / result.num_params if tokens_per_s else None,
      'output_tokens': output_tokens, 'prompt_tokens': prompt_tokens, 'requests': len(done),
      'mean_active_slots': (float(np.mean(stats.decode_active_slots))
                            if stats.decode_active_slots else None),
      'reason': missing,
  }

  # Decode reads every weight (of an untied embedding only the rows it gathers) and the whole
  # cache each step (static shapes: the attention runs over every slot of every row, masked),
  # so that is what the step's bandwidth is judged by (Engine.decode_bytes_per_step).
  bytes_per_step = result.decode_weight_bytes + result.kv_cache_bytes
  step_s = float(np.median(stats.decode_step_s)) if stats.decode_step_s else None
  bandwidth, bandwidth_source = peak_bandwidth_bytes_per_s(result.device_kind, bandwidth_override)
  achieved_bw = bytes_per_step / step_s if step_s else None
  peak, peak_source = peak_flops_per_s(result.device_kind, peak_override)
  compute = {
      'decode_bytes_per_step': bytes_per_step,
      'decode_weight_bytes_per_step': result.decode_weight_bytes,
      'decode_bytes_per_s': achieved_bw,
      'peak_bandwidth_bytes_per_s': bandwidth,
      'peak_bandwidth_source': bandwidth_source,
      'mbu': achieved_bw / bandwidth if achieved_bw and bandwidth else None,
      'peak_flops_per_s_per_device': peak,
      'peak_source': peak_source,
      'nvml_utilization_pct_mean': result.sampler.get('utilization_pct_mean'),
      'reason': (None if step_s else 'no decode steps ran') or (None if bandwidth
                                                                  else bandwidth_source),
  }

  s = result.sampler
  memory = _memory(s, weight_bytes=result.weight_bytes, kv_cache_bytes=result.kv_cache_bytes,
                   kv_cache_bytes_per_token=result.kv_cache_bytes_per_token,
                   plan=getattr(result, 'memory_plan', None) or None)

  e = dict(result.energy)
  energy_j = e.get('energy_j')
  energy = {**e, 'avg_power_w_sampled': s.get('power_w_mean'),
            'joules_per_output_token': (energy_j / output_tokens
                                        if energy_j is not None and output_tokens else None),
            'joules_per_request': energy_j / len(done) if energy_j is not None and done else None}

  q = result.quality
  size_ratio = result.baseline_weight_bytes / result.weight_bytes
  compression = {
      'weight_bytes': result.weight_bytes,
      'weight_bytes_per_param': result.weight_bytes / result.num_params,
      'baseline_weight_bytes': result.baseline_weight_bytes,
      'baseline_precision': 'bf16',
      'size_ratio': size_ratio,
      'quality_ratio': q.get('quality_ratio'),
      'mcr': size_ratio * q['quality_ratio'] if q.get('quality_ratio') is not None else None,
      'reason': None if q.get('quality_ratio') is not None else 'no held-out perplexity',
  }
  trace = {'available': False, 'reason': 'inference runs are not traced'}
  return {'memory': memory, 'compute': compute, 'latency': latency, 'throughput': throughput,
          'energy': energy, 'compression': compression, 'trace': trace}
