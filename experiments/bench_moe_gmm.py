"""Grouped-matmul throughput at real MoE shapes: ours against the alternatives.

For each shape and group-size distribution (even, Dirichlet-skewed): `jax.lax.ragged_dot`,
tokamax's `ragged_dot` (where installed), a capacity-style batched einsum (every expert padded
to the largest group), a dense matmul of the same FLOPs, kernels/moe_gmm's Triton and Mosaic
GPU kernels at each candidate tiling of its autotuner (rows `ours_<impl>_<index>`, the index
into kernels.moe_gmm.ops.CANDIDATES[impl, 'gmm']; one tiling drives all three products of
fwd+bwd), and `ours_autotuned` (implementation=None, tiling='autotune': each product's
implementation and tiling tuned on its own; the row records what was chosen). Forward and
forward+backward TFLOP/s (fwd = 2·rows·k·n; fwd+bwd counted as 3× fwd). Every output and both
gradients are checked against a per-group reference before anything is timed.

Timing: `repeats` calls issued back to back and synchronised once, median of 3 such rounds
(kernels.moe_gmm.autotune.seconds_per_call): per-call synchronisation would add the host
round trip to sub-millisecond kernels. Results before this change were timed call by call.

  python -m experiments.bench_moe_gmm --out=FILE.json [--quick] [--shapes=deepseek_v2_lite]
      [--impls=mosaic_gpu,autotuned] [--tilings=0,1] [--groups=even] [--repeats=N]
"""

import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.errors import max_abs, max_abs_diff
from kernels.moe_gmm import autotune, gmm, ops, reference

_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')
_QUICK = flags.DEFINE_bool('quick', False, 'tiny shapes on any backend (a check of the script)')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'timed calls per variant')
_SHAPES = flags.DEFINE_list('shapes', None, 'only these shape names (a device call has 10 '
                            'minutes: split the three shapes over calls)')
_TILINGS = flags.DEFINE_list('tilings', None, "only these indices of each implementation's "
                             'candidate tilings')
_GROUPS = flags.DEFINE_list('groups', ['even', 'skewed'], 'group-size distributions to run')
FAMILIES = ('ragged_dot', 'tokamax', 'dense', 'capacity', 'triton', 'mosaic_gpu', 'autotuned')
_IMPLS = flags.DEFINE_list('impls', None, f'only these variant families: {", ".join(FAMILIES)}')

# (name, experts, top_k, tokens, k, n): rows = tokens × top_k; DeepSeek-V3's token count is
# scaled down so its 256 experts fit one GPU.
SHAPES = [
    ('mixtral_8x7b', 8, 2, 8192, 4096, 14336),
    ('deepseek_v2_lite', 64, 6, 2731, 2048, 1408),  # 16,386 rows, as in the device README
    ('deepseek_v3', 256, 8, 4096, 7168, 2048),
]
QUICK_SHAPES = [('quick', 4, 2, 96, 64, 48)]


def group_sizes(kind: str, rows: int, experts: int, rng) -> np.ndarray:
  if kind == 'even':
    sizes = np.full(experts, rows // experts)
  else:  # Dirichlet(0.5) loads: a few hot experts, some nearly idle
    sizes = np.floor(rng.dirichlet(np.full(experts, 0.5)) * rows).astype(np.int64)
  sizes[0] += rows - sizes.sum()
  return sizes.astype(np.int32)


def reference_grads_by_slices(lhs, rhs, sizes: np.ndarray):
  """Gradients of sum(gmm) (an all-ones cotangent), per group on concrete slices."""
  ones = jnp.ones((lhs.shape[0], rhs.shape[2]), lhs.dtype)
  return (reference.gmm_by_slices(ones, rhs, sizes, transpose_rhs=True).astype(lhs.dtype),
          reference.tgmm_by_slices(lhs, ones, sizes).astype(rhs.dtype))


class _Wrong(Exception):
  """A variant's output or gradients disagree with the reference: it is not timed."""


def timed(fn, *args) -> float:
  """Seconds per call: back to back, synchronised once, median of 3 rounds (after 2 warm-ups)."""
  return autotune.seconds_per_call(lambda: fn(*args), _REPEATS.value)


def fwd_bwd(f):
  """value_and_grad of sum(f) w.r.t. lhs and rhs: the training cost of the product."""
  return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32)),
                                    argnums=(0, 1)))


def _autotune_choices(lhs, rhs, experts) -> dict:
  """What tiling='autotune' chose per product, with every candidate's time and error."""
  (rows, k), n = lhs.shape, rhs.shape[2]
  return {product: ops.autotune_report(product, *ops.product_shapes(product, rows, k, n, experts),
                                       experts, lhs.dtype)
          for product in ops.PRODUCTS}


def main(argv):
  del argv
  shapes = QUICK_SHAPES if _QUICK.value else SHAPES
  if _SHAPES.value:
    unknown = set(_SHAPES.value) - {s[0] for s in SHAPES}
    if unknown:
      raise app.UsageError(f'unknown --shapes {sorted(unknown)}; valid: {[s[0] for s in SHAPES]}')
    shapes = [s for s in shapes if s[0] in _SHAPES.value]
  if set(_GROUPS.value) - {'even', 'skewed'}:
    raise app.UsageError(f"--groups takes even and/or skewed, got {_GROUPS.value}")
  families = _IMPLS.value or list(FAMILIES)
  unknown = set(families) - set(FAMILIES)
  if unknown:
    raise app.UsageError(f'unknown --impls {sorted(unknown)}; valid: {list(FAMILIES)}')
  interpret = jax.default_backend() != 'gpu'
  # (implementation, index, tiling): rows are named by the index, whichever subset runs.
  kernels = []
  for impl in ('triton', 'mosaic_gpu'):
    candidates = ops.CANDIDATES[impl, 'gmm']
    chosen = [int(i) for i in _TILINGS.value] if _TILINGS.value else range(len(candidates))
    if impl in families:
      kernels += [(impl, i, candidates[i]) for i in chosen if i < len(candidates)]
  if interpret:
    # A check of the script: interpreted, at small tiles, the default tiling only. Mosaic GPU
    # is left to tests/kernels (jax 0.10's GPU interpreter needs a shim for the transposed
    # operands of the backward pass).
    kernels = [(impl, i, dict(t, block_m=16, block_n=16, block_k=16))
               for impl, i, t in kernels if impl == 'triton' and i == 0]
    families = [f for f in families if f != 'autotuned']
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    tokamax, tokamax_error = None, repr(e)
  results = {'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
             'repeats': _REPEATS.value, 'timing': 'back to back, median of 3 rounds',
             'command': ' '.join(['python -m experiments.bench_moe_gmm', *sys.argv[1:]]),
             'runs': []}
  rng = np.random.default_rng(0)
  for name, experts, top_k, tokens, k, n in shapes:
    rows = tokens * top_k
    # Drawn on the device: DeepSeek-V3's weights are 3.8e9 values, 30 GB as numpy's float64
    # draws on the host.
    lhs_key, rhs_key = jax.random.split(jax.random.key(len(results['runs'])))
    lhs = jax.random.normal(lhs_key, (rows, k), jnp.bfloat16)
    rhs = jax.random.normal(rhs_key, (experts, k, n), jnp.bfloat16) * jnp.bfloat16(k ** -0.5)
    flops = 2.0 * rows * k * n
    for kind in _GROUPS.value:
      sizes_np = group_sizes(kind, rows, experts, rng)
      sizes = jnp.asarray(sizes_np)
      setup_start = time.perf_counter()
      want = reference.gmm_by_slices(lhs, rhs, sizes_np).astype(lhs.dtype)
      scale = float(max_abs(want))
      # Per-slice gradients: ragged_dot's own backward materialises [groups, rows, k] on GPU
      # and runs out of memory at DeepSeek-V3's shape.
      ref_dl, ref_dr = jax.block_until_ready(reference_grads_by_slices(lhs, rhs, sizes_np))
      cap = int(sizes_np.max())
      variants = {}
      if 'ragged_dot' in families:
        variants['ragged_dot'] = lambda a, b: jax.lax.ragged_dot(a, b, sizes)
      if 'dense' in families:
        variants['dense_same_flops'] = None
      if 'capacity' in families:
        variants['batched_einsum_capacity'] = None
      if tokamax is not None and 'tokamax' in families:
        variants['tokamax_ragged_dot'] = lambda a, b: tokamax.ragged_dot(a, b, sizes)
      for impl, i, tiling in kernels:
        variants[f'ours_{impl}_{i}'] = (lambda a, b, impl=impl, t=tiling: gmm(
            a, b, sizes, implementation=impl, tiling=t, interpret=interpret))
      if 'autotuned' in families:
        variants['ours_autotuned'] = lambda a, b: gmm(a, b, sizes, tiling='autotune')
      run = {'shape': name, 'groups': kind, 'rows': rows, 'experts': experts, 'k': k, 'n': n,
             'max_group': cap, 'fwd_flops': flops,
             'reference_s': time.perf_counter() - setup_start, 'variants': {}}
      results['runs'].append(run)
      for vname, f in variants.items():
        entry = {}
        row_start = time.perf_counter()
        try:
          if vname == 'dense_same_flops':
            w = rhs[0]
            fwd = jax.jit(lambda a: a @ w)
            entry['fwd_ms'] = timed(fwd, lhs) * 1e3
            g = jax.jit(jax.value_and_grad(lambda a, w: jnp.sum((a @ w).astype(jnp.float32)),
                                           argnums=(0, 1)))
            entry['fwd_bwd_ms'] = timed(g, lhs, w) * 1e3
          elif vname == 'batched_einsum_capacity':
            # Capacity-style dispatch: every expert gets max-group rows (padding included).
            x = jnp.zeros((experts, cap, k), lhs.dtype)
            f2 = jax.jit(lambda x, b: jnp.einsum('gck,gkn->gcn', x, b))
            entry['fwd_ms'] = timed(f2, x, rhs) * 1e3
            g = jax.jit(jax.value_and_grad(
                lambda x, b: jnp.sum(jnp.einsum('gck,gkn->gcn', x, b).astype(jnp.float32)),
                argnums=(0, 1)))
            entry['fwd_bwd_ms'] = timed(g, x, rhs) * 1e3
            entry['note'] = f'padded to {cap} rows per expert: {experts * cap / rows:.2f}x the work'
          else:
            fwd = jax.jit(f)
            got = fwd(lhs, rhs)
            err = float(max_abs_diff(got, want))
            entry['max_abs_err_vs_reference'] = err
            entry['correct'] = err <= 2e-2 * scale
            if not entry['correct']:
              raise _Wrong('forward')
            # One jitted function for the check and the timing: a second fwd_bwd(f) would be
            # a new function to jax, traced and compiled again on the device's time.
            grads = fwd_bwd(f)
            _, (dl, dr) = grads(lhs, rhs)
            entry['grad_rel_err'] = max(
                float(max_abs_diff(x, y)) / (float(max_abs(y)) + 1e-9)
                for x, y in ((dl, ref_dl), (dr, ref_dr)))
            entry['correct'] = entry['grad_rel_err'] <= 2e-2
            if not entry['correct']:
              raise _Wrong('gradients')
            entry['fwd_ms'] = timed(fwd, lhs, rhs) * 1e3
            entry['fwd_bwd_ms'] = timed(grads, lhs, rhs) * 1e3
            if vname == 'ours_autotuned':
              entry['chosen'] = _autotune_choices(lhs, rhs, experts)
          entry['fwd_tflops'] = flops / (entry['fwd_ms'] * 1e-3) / 1e12
          entry['fwd_bwd_tflops'] = 3 * flops / (entry['fwd_bwd_ms'] * 1e-3) / 1e12
        except _Wrong as e:
          entry['error'] = f'wrong {e}: not timed'
        except Exception as e:  # pylint: disable=broad-except
          entry['error'] = f'{type(e).__name__}: {str(e)[:400]}'
          entry['traceback_tail'] = traceback.format_exc()[-800:]
        # Compiles, checks and timing together: what the row cost the device call.
        entry['row_s'] = time.perf_counter() - row_start
        run['variants'][vname] = entry
        print(name, kind, vname, {k: (round(v, 2) if isinstance(v, float) else v)
                                  for k, v in entry.items() if k != 'traceback_tail'}, flush=True)
        # After every row: a device call cut by its time limit keeps what it measured.
        _write(results)
  if tokamax is None:
    results['tokamax'] = f'not importable: {tokamax_error}'
  _write(results)


def _write(results: dict) -> None:
  if _OUT.value:  # whole or not at all: a check cut mid-write keeps the previous rows
    with open(_OUT.value + '.tmp', 'w') as fh:
      json.dump(results, fh, indent=1)
    os.replace(_OUT.value + '.tmp', _OUT.value)


if __name__ == '__main__':
  app.run(main)
