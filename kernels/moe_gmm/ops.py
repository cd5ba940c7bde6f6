"""The public grouped matmuls: `gmm` and `tgmm`, differentiable, with an `implementation` choice.

implementation:
  None        the best verified one for the backend: 'mosaic_gpu' on Hopper GPUs with bf16 /
              fp16 operands, 'triton' on other NVIDIA GPUs and dtypes, 'xla' elsewhere. On an
              H100 both are exact, forward and gradients, at the Mixtral, DeepSeek-V2-Lite and
              -V3 shapes with even and skewed groups; Mosaic's defaults are 1.3-1.45x
              Triton's forward and 1.1-1.5x its forward+backward there, and Triton was 4-10x
              ragged_dot (experiments/results/h100/README.md). With tiling='autotune' on a GPU,
              every implementation that can run competes per shape (see below);
  'xla'       `jax.lax.ragged_dot` (any backend; JAX differentiates it);
  'triton'    the Pallas-Triton kernels (NVIDIA GPU, or anywhere with interpret=True);
  'mosaic_gpu' the Pallas Mosaic GPU kernels: TMA + wgmma, persistent (Hopper, sm_90; bf16 or
              fp16 operands; anywhere with interpret=True, through jax's GPU interpreter);
  'reference' the plain-jnp specification (slow: one matmul per group; for tests).

tiling:
  None        the implementation's defaults (triton.DEFAULT_TILING, mosaic_gpu.DEFAULT_TILING /
              DEFAULT_TGMM_TILING);
  a dict      overrides of those defaults for the three products (forward, the input gradient
              and the weight gradient), each taking the keys its kernel has;
  'autotune'  each product's tiling (and, with implementation=None, its implementation) is
              the fastest of a fixed candidate list for its shapes on this device, timed once
              at trace time on random inputs with uneven groups (alternately a quarter above
              and below the mean) and cached in memory and on disk (autotune.py). A candidate
              is timed only after its output matched an exact per-group product: a fast wrong
              kernel cannot win. A candidate costs a compile and a few dozen timed calls
              (59 candidates for the three products with implementation=None; not yet timed
              on a GPU, expect minutes for a new shape), nothing once cached. Tuning
              allocates one set of operands of the product's shape on the device. Each
              process tunes on its own: in a multi-process run the processes may pick
              different tilings (the kernels' internals only, not the program's
              collectives); tune once and share the cache file (EFFICIENTJAX_CACHE_DIR) to
              keep every process's program identical. Off a GPU there is nothing to tune:
              implementation=None is 'xla'.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from kernels.moe_gmm import autotune
from kernels.moe_gmm import mosaic_gpu as mosaic_impl
from kernels.moe_gmm import reference
from kernels.moe_gmm import triton as triton_impl

IMPLEMENTATIONS = ('xla', 'triton', 'mosaic_gpu', 'reference')
_KERNELS = {'triton': triton_impl, 'mosaic_gpu': mosaic_impl}
# The three products of a training step: forward, input gradient (rhs read transposed), weight
# gradient. Each is tuned on its own: their shapes and best tiles differ.
PRODUCTS = ('gmm', 'gmm_transposed', 'tgmm')

# Candidate tilings per (implementation, product); the first of each is the default. The
# Triton gmm list is experiments/bench_moe_gmm.py's (its rows are named by index in it).
_TRITON_GMM = [
    triton_impl.DEFAULT_TILING,
    dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=256, block_k=32, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
    # The default tiles walked in bands (triton.gmm's `band`): L2 reuse of lhs and weights.
    dict(triton_impl.DEFAULT_TILING, band=8),
    dict(triton_impl.DEFAULT_TILING, band=32),
    dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, band=16),
]
_TRITON_TGMM = [
    triton_impl.DEFAULT_TILING,
    dict(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3),
    # Group-major launch order: a group's rows stay in L2 for all its tiles.
    dict(triton_impl.DEFAULT_TILING, group_major=True),
    dict(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3, group_major=True),
]
_MOSAIC_GMM = [
    mosaic_impl.DEFAULT_TILING,
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, band=1),
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, band=32),
    dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=6, band=8),
    dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4, band=8),
    dict(block_m=128, block_n=64, block_k=64, max_concurrent_steps=6, band=8),
    dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=2, band=8),
    # Warp-specialised: a producer warpgroup and two consumers of block_m / 2 rows each.
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, band=8, consumers=2),
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6, band=8, consumers=2),
    dict(block_m=128, block_n=256, block_k=64, max_concurrent_steps=3, band=8, consumers=2),
    dict(block_m=256, block_n=128, block_k=64, max_concurrent_steps=3, band=8, consumers=2),
    # Two programs per SM: 96 KiB of shared memory each, so both fit an H100 SM's 228 KiB.
    dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=2, band=8,
         programs_per_sm=2),
]
_MOSAIC_TGMM = [
    mosaic_impl.DEFAULT_TGMM_TILING,
    dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=3),
    dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4),
    dict(block_m=64, block_n=64, block_k=128, max_concurrent_steps=4),
    # Two programs per SM (96 KiB of shared memory each): one's pipeline start-up overlaps
    # the other's wgmmas, where a small group gives each output tile only a few row blocks.
    dict(block_m=64, block_n=128, block_k=128, max_concurrent_steps=2,
         programs_per_sm=2),
    # Warp-specialised: two consumers of 128 output rows each, a 256 × 128 tile.
    dict(block_m=64, block_n=128, block_k=256, max_concurrent_steps=3, consumers=2),
    dict(block_m=64, block_n=128, block_k=256, max_concurrent_steps=2, consumers=2),
]
CANDIDATES = {
    ('triton', 'gmm'): _TRITON_GMM, ('triton', 'gmm_transposed'): _TRITON_GMM,
    ('triton', 'tgmm'): _TRITON_TGMM,
    ('mosaic_gpu', 'gmm'): _MOSAIC_GMM, ('mosaic_gpu', 'gmm_transposed'): _MOSAIC_GMM,
    ('mosaic_gpu', 'tgmm'): _MOSAIC_TGMM,
}


# Triton's default tiles are sized for 16-bit operands: with float32 ones the step of the
# MoE memory check failed to compile on an H100 ("Shared memory size limit exceeded: requested
# 262144, available: 232448"). Four-byte operands take half the K depth and two stages, which
# by the smem counts of the two compile errors seen there (stages × operand blocks, plus the
# f32 output tile for gmm) need at most 160 KiB.
_TRITON_WIDE_OPERANDS = dict(block_k=32, num_stages=2)


def _defaults(impl: str, product: str, itemsize: int = 2) -> dict:
  defaults = dict(CANDIDATES[impl, product][0])
  if impl == 'triton' and itemsize >= 4:
    defaults.update(_TRITON_WIDE_OPERANDS)
  return defaults


def _hopper() -> bool:
  """sm_90: wgmma exists on Hopper only (Blackwell's tensor cores take tcgen05 instead)."""
  device = jax.devices()[0]
  try:
    return device.platform == 'gpu' and device.compute_capability.split('.')[0] == '9'
  except AttributeError:  # no compute capability: not an NVIDIA GPU
    return False


def _resolve(implementation: str | None, interpret: bool, dtypes: tuple) -> str:
  if implementation is None:
    if jax.default_backend() != 'gpu' or interpret:
      return 'xla'
    # Measured on an H100: Mosaic's defaults 1.3-1.45x Triton's forward and 1.1-1.5x its
    # forward+backward, exact at every shape (experiments/results/h100/README.md).
    supported = set(map(jnp.dtype, mosaic_impl.SUPPORTED_DTYPES))
    mosaic = _hopper() and len(set(dtypes)) == 1 and jnp.dtype(dtypes[0]) in supported
    return 'mosaic_gpu' if mosaic else 'triton'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'moe_gmm: unknown implementation {implementation!r}; valid: None, '
                     f'{", ".join(IMPLEMENTATIONS)}')
  if implementation == 'triton' and jax.default_backend() != 'gpu' and not interpret:
    raise ValueError(f"moe_gmm: implementation 'triton' needs an NVIDIA GPU (this backend is "
                     f"{jax.default_backend()}); pass interpret=True to run it on the CPU, or "
                     "use 'xla'")
  if implementation == 'mosaic_gpu' and not interpret and not _hopper():
    raise ValueError("moe_gmm: implementation 'mosaic_gpu' needs a Hopper GPU (sm_90: wgmma "
                     f"and TMA; this device is {jax.devices()[0].device_kind}); pass "
                     "interpret=True to run it on the CPU, or use 'triton' / 'xla'")
  return implementation


def _check(lhs, rhs, group_sizes):
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f'moe_gmm: want lhs [m, k] and rhs [groups, k, n], got {lhs.shape} and '
                     f'{rhs.shape}')
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'moe_gmm: group_sizes must be integers of shape ({rhs.shape[0]},), got '
                     f'{group_sizes.dtype}{list(group_sizes.shape)}')


def _freeze(tiling: dict) -> tuple:
  return tuple(sorted(tiling.items()))


class _Plan(tuple):
  """Per product: (implementation, frozen tiling) or (implementation-or-None, 'autotune').

  A tuple, so custom_vjp can hash it as a non-differentiable argument.
  """

  def get(self, product):
    return dict(self)[product]


def _knobs(impl: str, product: str) -> set[str]:
  """The tiling keywords the implementation's kernel for `product` takes, read off its
  signature (keyword-only, less the ones ops sets itself)."""
  kernel = _KERNELS[impl].tgmm if product == 'tgmm' else _KERNELS[impl].gmm
  params = inspect.signature(kernel).parameters.values()
  return ({p.name for p in params if p.kind is p.KEYWORD_ONLY}
          - {'transpose_rhs', 'preferred_element_type', 'interpret'})


def _plan(impl: str | None, tiling, interpret: bool, itemsize: int = 2) -> _Plan:
  if isinstance(tiling, str):
    if tiling != 'autotune':
      raise ValueError(f"moe_gmm: tiling must be None, a dict or 'autotune', got {tiling!r}")
    if interpret:
      raise ValueError("moe_gmm: tiling='autotune' times kernels on the device; it cannot "
                       'tune interpreted ones (interpret=True)')
    return _Plan((p, (impl, 'autotune')) for p in PRODUCTS)
  if tiling is not None and not isinstance(tiling, dict):
    raise ValueError(f"moe_gmm: tiling must be None, a dict or 'autotune', got {tiling!r}")
  tiling = tiling or {}
  knobs = {p: _knobs(impl, p) for p in PRODUCTS}
  unknown = set(tiling) - set().union(*knobs.values())
  if unknown:
    raise ValueError(f'moe_gmm: {impl} takes no tiling {sorted(unknown)}; its knobs are '
                     f'{sorted(set().union(*knobs.values()))}')
  # Each product takes the knobs its kernel has (e.g. gmm's `band`, tgmm's `group_major`).
  return _Plan((p, (impl, _freeze({**_defaults(impl, p, itemsize),
                                   **{k: v for k, v in tiling.items() if k in knobs[p]}})))
               for p in PRODUCTS)


def _run(impl: str, product: str, tiling: dict, a, b, group_sizes, out_dtype, interpret):
  """One product by one kernel module: gmm, gmm with rhs transposed, or tgmm."""
  module = _KERNELS[impl]
  if product == 'tgmm':
    return module.tgmm(a, b, group_sizes, preferred_element_type=out_dtype, interpret=interpret,
                       **tiling)
  return module.gmm(a, b, group_sizes, transpose_rhs=product == 'gmm_transposed',
                    preferred_element_type=out_dtype, interpret=interpret, **tiling)


def _choose(plan: _Plan, product: str, a, b, group_sizes, out_dtype, interpret):
  impl, tiling = plan.get(product)
  if tiling != 'autotune':
    return impl, dict(tiling)
  return _autotuned(impl, product, a.shape, b.shape, group_sizes.shape[0],
                    jnp.dtype(a.dtype), jnp.dtype(out_dtype))


def _product(plan, product, a, b, group_sizes, out_dtype, interpret):
  impl, tiling = _choose(plan, product, a, b, group_sizes, out_dtype, interpret)
  return _run(impl, product, tiling, a, b, group_sizes, out_dtype, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_gmm(lhs, rhs, group_sizes, out_dtype, plan, interpret):
  return _product(plan, 'gmm', lhs, rhs, group_sizes, out_dtype, interpret)


def _kernel_gmm_fwd(lhs, rhs, group_sizes, out_dtype, plan, interpret):
  return _kernel_gmm(lhs, rhs, group_sizes, out_dtype, plan, interpret), (lhs, rhs, group_sizes)


def _kernel_gmm_bwd(out_dtype, plan, interpret, residuals, grad):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  grad = grad.astype(lhs.dtype)
  # d_lhs = grad @ rhs[group]ᵀ: the kernel reads rhs transposed, no copy of the weights.
  d_lhs = _product(plan, 'gmm_transposed', grad, rhs, group_sizes, lhs.dtype, interpret)
  d_rhs = _product(plan, 'tgmm', lhs, grad, group_sizes, rhs.dtype, interpret)
  return d_lhs, d_rhs, None


_kernel_gmm.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        implementation: str | None = None, preferred_element_type=None,
        tiling: dict | str | None = None, interpret: bool = False) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)] for rows sorted by group; rows past sum(group_sizes) are 0.

  lhs [m, k], rhs [groups, k, n], group_sizes [groups] integers. Accumulates in fp32;
  returns `preferred_element_type` (default: lhs's dtype). `tiling`: see the module docstring.
  """
  _check(lhs, rhs, group_sizes)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if implementation is None and tiling == 'autotune' and jax.default_backend() == 'gpu':
    impl = None  # the tuner picks the implementation too
  else:
    impl = _resolve(implementation, interpret, (lhs.dtype, rhs.dtype))
  if impl == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                              preferred_element_type=out_dtype)
  if impl == 'reference':
    return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  if impl == 'mosaic_gpu':
    mosaic_impl.check_dtypes(lhs, rhs)
  return _kernel_gmm(lhs, rhs, group_sizes, out_dtype,
                     _plan(impl, tiling, interpret, jnp.dtype(lhs.dtype).itemsize), interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         implementation: str | None = None, preferred_element_type=None,
         tiling: dict | str | None = None, interpret: bool = False) -> jax.Array:
  """out[i] = lhs[rows of i]ᵀ @ grad[rows of i], [groups, k, n]: gmm's weight gradient."""
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if implementation is None and tiling == 'autotune' and jax.default_backend() == 'gpu':
    impl = None
  else:
    impl = _resolve(implementation, interpret, (lhs.dtype, grad.dtype))
  if impl in _KERNELS or impl is None:
    if impl == 'mosaic_gpu':
      mosaic_impl.check_dtypes(lhs, grad)
    plan = _plan(impl, tiling, interpret, jnp.dtype(lhs.dtype).itemsize)
    return _product(plan, 'tgmm', lhs, grad, group_sizes, out_dtype, interpret)
  if impl == 'reference':
    return reference.tgmm(lhs, grad, group_sizes, preferred_element_type=out_dtype)
  # XLA: the weight gradient of ragged_dot, which is exactly this product.
  weights = jnp.zeros((group_sizes.shape[0], lhs.shape[1], grad.shape[1]), lhs.dtype)
  _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(lhs, w, group_sizes.astype(jnp.int32),
                                                preferred_element_type=grad.dtype), weights)
  return vjp(grad)[0].astype(out_dtype)


# ---- autotuning ---------------------------------------------------------------------------

def _implementations_for(dtype) -> list[str]:
  """What may compete under implementation=None: every kernel this device and dtype can run."""
  impls = ['triton']
  if _hopper() and dtype in map(jnp.dtype, mosaic_impl.SUPPORTED_DTYPES):
    impls.append('mosaic_gpu')
  return impls


def product_shapes(product: str, m: int, k: int, n: int, groups: int) -> tuple:
  """(a_shape, b_shape) of one of PRODUCTS for the layer gmm(lhs [m, k], rhs [groups, k, n]):
  the shapes `autotune_report` takes."""
  return {'gmm': ((m, k), (groups, k, n)), 'gmm_transposed': ((m, n), (groups, k, n)),
          'tgmm': ((m, k), (m, n))}[product]


def _tuning_problem(product, a_shape, b_shape, groups, dtype, sizes=None):
  """Concrete random operands of the product's shapes, their group sizes, the exact result.

  Groups alternate a quarter above and below m // groups rows (the remainder belongs to no
  group), unless `sizes` gives them: uneven, so tiles straddle group boundaries as in
  training and the correctness check reaches that path; the exact result is
  reference.*_by_slices on those sizes.
  """
  m = a_shape[0]
  per = m // groups
  if sizes is None:
    sizes = np.full(groups, per)
    sizes[0:groups - groups % 2:2] += per // 4
    sizes[1:groups - groups % 2:2] -= per // 4
  sizes = np.asarray(sizes)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal(a_shape, np.float32), dtype)
  b = jnp.asarray(rng.standard_normal(b_shape, np.float32) / np.sqrt(b_shape[-1]), dtype)
  if product == 'tgmm':
    want = reference.tgmm_by_slices(a, b, sizes)
  else:
    want = reference.gmm_by_slices(a, b, sizes, transpose_rhs=product == 'gmm_transposed')
  return a, b, jnp.asarray(sizes, jnp.int32), want


def _autotune_key(impls, product, a_shape, b_shape, groups, dtype, out_dtype) -> tuple:
  return (product, tuple(a_shape), tuple(b_shape), groups, str(jnp.dtype(dtype)),
          str(jnp.dtype(out_dtype)), '+'.join(impls))


def autotune_report(product: str, a_shape, b_shape, groups: int, dtype, out_dtype=None,
                    implementation: str | None = None) -> dict | None:
  """What tiling='autotune' chose for one product in this process, with every candidate's
  time and error (autotune.last_report), or None if it was not tuned.

  product: 'gmm' (a = lhs [m, k], b = rhs [g, k, n]), 'gmm_transposed' (a = the output's
  gradient [m, n], b = rhs) or 'tgmm' (a = lhs, b = the output's gradient):
  `product_shapes(product, m, k, n, groups)`.
  """
  impls = [implementation] if implementation else _implementations_for(jnp.dtype(dtype))
  return autotune.last_report(product, _autotune_key(impls, product, a_shape, b_shape, groups,
                                                     dtype, out_dtype or dtype))


def _autotuned(impl, product, a_shape, b_shape, groups, dtype, out_dtype) -> tuple[str, dict]:
  impls = [impl] if impl is not None else _implementations_for(dtype)
  candidates = [dict(t, implementation=i) for i in impls for t in CANDIDATES[i, product]]
  key = _autotune_key(impls, product, a_shape, b_shape, groups, dtype, out_dtype)
  # Built once per tuning, outside `build`: every candidate runs on the same operands.
  problem = []

  def build(candidate):
    if not problem:
      problem.extend(_tuning_problem(product, a_shape, b_shape, groups, dtype))
    a, b, sizes, want = problem
    tiling = dict(candidate)
    which = tiling.pop('implementation')
    run = jax.jit(lambda a, b, s: _run(which, product, tiling, a, b, s, out_dtype, False))
    got = run(a, b, sizes)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    if not err <= 2e-2 * scale:  # also catches NaN
      raise ValueError(f'wrong result: max abs error {err:.3g} against {scale:.3g}')
    return lambda: run(a, b, sizes)

  best = autotune.tune(product, key, candidates, build)
  which = best.pop('implementation')
  return which, best
