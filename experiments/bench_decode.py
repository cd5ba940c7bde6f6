"""Decode speed and memory-bandwidth utilisation per precision, at batch 1 and 16, with random
weights at a real model's shape (Llama-3.2-1B or Llama-3.1-8B): what the inference axis's
costs are made of, without a checkpoint.

For each (precision, batch) the engine (`efficientjax/infer/engine.py`) serves `batch`
requests of a `--context`-token prompt and `--steps` new tokens each, all at once, so every
decode step runs with every slot busy. A row reports the median decode step, output tokens/s
(batch / step), and bandwidth utilisation: (weight bytes as stored + the whole KV cache's
bytes, of an untied input embedding only the rows gathered) / step / the device's peak
bandwidth (efficientjax/metrics/peaks.py). Before timing, the
first row of each precision checks the engine against the full forward pass: the log-
probabilities of its greedy tokens, recomputed from the whole sequence, agree within 0.1 nats
(bf16/int arithmetic; a broken cache or quantised matmul is off by whole nats).

  python -m experiments.bench_decode --out=FILE.json [--shape=1b|8b]
      [--precisions=bf16,fp16,int8,int4,fp8] [--batches=1,16] [--context=1024] [--steps=64]
"""

import json
import math
import time
import traceback

from absl import app, flags

_SHAPE = flags.DEFINE_enum('shape', '1b', ['1b', '8b', 'tiny'], 'model shape (tiny: CPU test)')
_PRECISIONS = flags.DEFINE_list('precisions', ['bf16', 'fp16', 'int8', 'int4', 'fp8'],
                                'inference.precision per row')
_BATCHES = flags.DEFINE_list('batches', ['1', '16'], 'decode slots per row')
_CONTEXT = flags.DEFINE_integer('context', 1024, 'prompt tokens per request')
_STEPS = flags.DEFINE_integer('steps', 64, 'new tokens per request (decode steps)')
_GROUP = flags.DEFINE_integer('group_size', 128, 'int4 group size')
_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')

# Llama-3.2-1B (configs/finetune_lora.py) and Llama-3.1-8B.
SHAPES = {
    '1b': dict(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, mlp_dim=8192, attention='gqa', tie_embeddings=True,
               rope_theta=500000.0),
    '8b': dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, mlp_dim=14336, attention='gqa', rope_theta=500000.0),
    'tiny': dict(vocab_size=512, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=256, attention='gqa'),
}


def _check(cfg, params, completion, prompt) -> float:
  """The largest gap (nats) between the engine's logprobs and the full forward pass's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efficientjax.model import Transformer  # pylint: disable=g-import-not-at-top
  tokens = jnp.asarray([list(prompt) + completion.tokens[:-1]], jnp.int32)
  logp = jax.nn.log_softmax(Transformer(cfg).apply({'params': params}, tokens)[0], axis=-1)
  start = len(prompt) - 1
  want = [float(logp[start + i, t]) for i, t in enumerate(completion.tokens)]
  return max(abs(a - b) for a, b in zip(completion.logprobs, want))


def run_row(precision: str, batches: list[int]) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from efficientjax import quant  # pylint: disable=g-import-not-at-top
  from efficientjax.attention import cache as kv_cache  # pylint: disable=g-import-not-at-top
  from efficientjax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
  from efficientjax.infer.workload import Request  # pylint: disable=g-import-not-at-top
  from efficientjax.metrics.peaks import peak_bandwidth_bytes_per_s  # pylint: disable=g-import-not-at-top
  from efficientjax.model import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top

  dtype = quant.compute_dtype(precision)
  cfg = ModelConfig(**SHAPES[_SHAPE.value], dtype=jnp.dtype(dtype),
                    param_dtype=jnp.dtype(jnp.bfloat16),
                    max_seq_len=_CONTEXT.value + _STEPS.value)
  init = jax.jit(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 8), jnp.int32))['params'])
  params = init(jax.random.key(0))
  t0 = time.perf_counter()
  params, report = quant.quantize(cfg, params, precision=precision, group_size=_GROUP.value)
  params = jax.block_until_ready(params)
  quantize_s = time.perf_counter() - t0
  weight_bytes = quant.weight_bytes(params)
  device = jax.devices()[0]
  peak, peak_source = peak_bandwidth_bytes_per_s(device.device_kind)
  rows = []
  rng = np.random.default_rng(0)
  for i, batch in enumerate(batches):
    # One prefill shape that divides both the prompt and the cache, so the cache holds exactly
    # context + steps slots (a cache rounded up to a bigger chunk would be read every step).
    chunk = math.gcd(_CONTEXT.value, _CONTEXT.value + _STEPS.value)
    engine = Engine(cfg, params, num_slots=batch, max_len=_CONTEXT.value + _STEPS.value,
                    prefill_chunk=chunk, buckets=(chunk,))
    compile_s = engine.warmup()
    prompts = [rng.integers(0, cfg.vocab_size, _CONTEXT.value).tolist() for _ in range(batch)]
    out = engine.serve([Request(j, p, _STEPS.value) for j, p in enumerate(prompts)])
    gap = _check(cfg, params, out[0], prompts[0]) if i == 0 else None
    if gap is not None and gap > 0.1:
      raise AssertionError(f'{precision}: the engine is {gap:.3f} nats from the full forward pass')
    # Every step after the last request's prefill runs with all slots busy.
    steps = [s for s, n in zip(engine.stats.decode_step_s, engine.stats.decode_active_slots)
             if n == batch]
    step_s = float(np.median(steps))
    cache_bytes = kv_cache.nbytes(engine.cache)
    bytes_per_step = engine.decode_bytes_per_step()
    rows.append({
        'precision': precision, 'batch': batch, 'context': _CONTEXT.value,
        'decode_steps': len(steps), 'decode_step_ms_p50': step_s * 1e3,
        'decode_step_ms_p90': float(np.percentile(steps, 90)) * 1e3,
        'output_tokens_per_s': batch / step_s, 'weight_bytes': weight_bytes,
        'kv_cache_bytes': cache_bytes, 'bytes_per_step': bytes_per_step,
        'bandwidth_bytes_per_s': bytes_per_step / step_s, 'peak_bandwidth_bytes_per_s': peak,
        'mbu': bytes_per_step / step_s / peak if peak else None, 'peak_source': peak_source,
        'compile_s': compile_s, 'quantize_s': quantize_s, 'logprob_gap_nats': gap,
        'quantized': len(report.get('quantized', [])) if isinstance(report, dict) else None,
    })
    print(json.dumps(rows[-1]), flush=True)
    del engine
  return rows


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from efficientjax.metrics.record import environment  # pylint: disable=g-import-not-at-top
  batches = [int(b) for b in _BATCHES.value]
  rows, errors = [], {}
  for precision in _PRECISIONS.value:
    try:
      rows += run_row(precision, batches)
    except Exception:  # pylint: disable=broad-except
      errors[precision] = traceback.format_exc()
      print(errors[precision], flush=True)
  result = {'shape': _SHAPE.value, 'model': SHAPES[_SHAPE.value], 'context': _CONTEXT.value,
            'steps': _STEPS.value, 'rows': rows, 'errors': errors, 'env': environment(),
            'device_kind': jax.devices()[0].device_kind}
  bf16 = {r['batch']: r for r in rows if r['precision'] == 'bf16'}
  result['summary'] = {f'{r["precision"]}_b{r["batch"]}_speedup_over_bf16':
                       bf16[r['batch']]['decode_step_ms_p50'] / r['decode_step_ms_p50']
                       for r in rows if r['batch'] in bf16}
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=1)
  if errors:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
