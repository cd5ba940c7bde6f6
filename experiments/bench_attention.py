"""Time and memory of one attention layer per variant, forward and forward+backward.

Each variant at the attention study's shape (configs/attention_<variant>.py: hidden 1536, 12
query heads), bf16, one sequence of each length, through each SDPA implementation it can use
(cuDNN and XLA on a GPU; NSA through kernels/nsa's Triton kernels, `kernels`, and its dense
reference, `xla`). Per row: median and spread of the
step time after warm-up, XLA's memory analysis of the compiled step (temporaries: the
attention's working set; the device's own peak counter is process-wide and cumulative, so it
cannot separate rows), and the analytic
forward FLOPs of the layer (so rows compare as TFLOP/s too). A row that fails (out of memory at
16k, an implementation refusing a shape) records the error and the rest go on.

  python -m experiments.bench_attention --out=FILE.json [--variants=mha,mla] [--seq_lens=4096,16384]
      [--impls=cudnn,xla] [--repeats=N] [--quick]     (NSA rows: kernels and xla on a GPU)
"""

import dataclasses
import importlib
import json
import statistics
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from efficientjax.attention import ATTENTION
from efficientjax.model import ModelConfig

_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')
_VARIANTS = flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla', 'nsa'], 'variants')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['4096', '16384'], 'tokens per sequence')
_IMPLS = flags.DEFINE_list('impls', ['cudnn', 'xla'], 'SDPA implementations to try')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'timed calls per row')
_QUICK = flags.DEFINE_bool('quick', False, 'the smoke shapes, short sequences, fp32 (any backend)')


# NSA's attention is not the SDPA core: its rows are named by model.nsa.implementation's.
NSA_IMPLS = {'xla': 'reference', 'kernels': 'triton'}
# The longest sequence whose dense NSA reference fits an 80 GB GPU (its [T, T] scores per
# branch and head): longer kernel rows are timed unchecked, and say so.
NSA_REFERENCE_MAX_LEN = 16384


def layer_config(variant: str, impl: str, quick: bool) -> ModelConfig:
  c = importlib.import_module(f'configs.attention_{variant}').get_config(
      'smoke' if quick else None).to_dict()
  c['model'].update(attention_impl='xla' if variant == 'nsa' else impl,
                    dtype='float32' if quick else 'bfloat16',
                    param_dtype='float32' if quick else 'bfloat16')
  if variant == 'nsa':
    c['model']['nsa']['implementation'] = NSA_IMPLS[impl]
  return ModelConfig.from_config(c['model'], tokenizer_vocab_size=257)


def timed(fn, *args, repeats: int) -> dict[str, float]:
  jax.block_until_ready(fn(*args))  # warm-up (fn is compiled already)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return {'p50_ms': statistics.median(times), 'min_ms': min(times), 'max_ms': max(times),
          'count': len(times)}


def bench_one(variant: str, impl: str, seq_len: int, repeats: int, quick: bool) -> dict:
  cfg = layer_config(variant, impl, quick)
  layer = ATTENTION.get(cfg.attention)(cfg)
  x = jax.random.normal(jax.random.key(0), (1, seq_len, cfg.embed_dim), cfg.dtype)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x, positions))

  def forward(p, x):
    return layer.apply(p, x, positions)[0]

  def loss(p, x):
    return jnp.mean(forward(p, x).astype(jnp.float32) ** 2)

  # Compiled once, ahead of time: the same executables are timed and memory-analysed.
  fwd = jax.jit(forward).lower(params, x).compile()
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  # Check the implementation against XLA's before timing anything.
  checked = impl == 'xla' or variant != 'nsa' or seq_len <= NSA_REFERENCE_MAX_LEN
  if impl != 'xla' and checked:
    ref_cfg = dataclasses.replace(cfg, attention_impl='xla',
                                  nsa=dataclasses.replace(cfg.nsa, implementation='reference'))
    ref_layer = ATTENTION.get(cfg.attention)(ref_cfg)
    want = jax.jit(lambda p, x: ref_layer.apply(p, x, positions)[0])(params, x)
    got = fwd(params, x)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    if not err <= 2e-2 * scale + 1e-3:
      raise AssertionError(f'{impl} differs from xla by {err} (output scale {scale})')
    del want, got
  row = {'forward': timed(fwd, params, x, repeats=repeats),
         'forward_backward': timed(fwd_bwd, params, x, repeats=repeats),
         'checked_against_xla': checked}
  for name, compiled in (('forward', fwd), ('forward_backward', fwd_bwd)):
    analysis = compiled.memory_analysis()
    row[name]['temp_bytes'] = getattr(analysis, 'temp_size_in_bytes', None)
    row[name]['argument_bytes'] = getattr(analysis, 'argument_size_in_bytes', None)
  flops = ATTENTION.get(cfg.attention).flops_per_token(cfg, seq_len)
  fwd_flops = seq_len * (flops['projections'] + flops['attention'])
  row['forward_flops_analytic'] = fwd_flops
  row['forward']['tflops_per_s'] = fwd_flops / row['forward']['p50_ms'] / 1e9
  row['forward_backward']['tflops_per_s'] = 3 * fwd_flops / row['forward_backward']['p50_ms'] / 1e9
  return row


def main(argv):
  del argv
  quick = _QUICK.value
  seq_lens = [128, 256] if quick else [int(s) for s in _SEQ_LENS.value]
  backend = jax.default_backend()
  impls = [i for i in _IMPLS.value if backend == 'gpu' or i != 'cudnn']
  rows = []
  for variant in _VARIANTS.value:
    variant_impls = impls
    if variant == 'nsa':  # the kernels compile for NVIDIA GPUs only
      variant_impls = ['kernels', 'xla'] if backend == 'gpu' else ['xla']
    for impl in variant_impls:
      for seq_len in seq_lens:
        row = {'variant': variant, 'impl': impl, 'seq_len': seq_len}
        try:
          row.update(bench_one(variant, impl, seq_len, _REPEATS.value, quick))
        except Exception as e:  # noqa: BLE001 - a failed row is a result (e.g. OOM at 16k)
          row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
          traceback.print_exc()
        rows.append(row)
        summary = row.get('error') or (f'fwd {row["forward"]["p50_ms"]:.2f} ms, fwd+bwd '
                                       f'{row["forward_backward"]["p50_ms"]:.2f} ms')
        print(f'{variant:4s} {impl:6s} {seq_len:6d}: {summary}', flush=True)
  result = {'device': jax.devices()[0].device_kind, 'backend': backend, 'jax': jax.__version__,
            'quick': quick, 'rows': rows}
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
