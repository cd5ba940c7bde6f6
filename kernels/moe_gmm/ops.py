"""The public grouped matmuls: `gmm` and `tgmm`, differentiable, with an `implementation` choice.

implementation:
  None      the best verified one for the backend: 'triton' on NVIDIA GPUs (on an H100 it is
            correct, forward and gradients, at the Mixtral and DeepSeek-V2-Lite shapes with even
            and skewed groups, and 4-10x faster than ragged_dot: experiments/results/h100/
            README.md), 'xla' elsewhere;
  'xla'     `jax.lax.ragged_dot` (any backend; JAX differentiates it);
  'triton'  the Pallas-Triton kernels (NVIDIA GPU, or anywhere with interpret=True);
  'reference' the plain-jnp specification (slow: one matmul per group; for tests).
"""

import functools

import jax
import jax.numpy as jnp

from kernels.moe_gmm import reference
from kernels.moe_gmm import triton as triton_impl

IMPLEMENTATIONS = ('xla', 'triton', 'reference')


def _resolve(implementation: str | None, interpret: bool) -> str:
  if implementation is None:
    return 'triton' if jax.default_backend() == 'gpu' and not interpret else 'xla'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'moe_gmm: unknown implementation {implementation!r}; valid: None, '
                     f'{", ".join(IMPLEMENTATIONS)}')
  if implementation == 'triton' and jax.default_backend() != 'gpu' and not interpret:
    raise ValueError(f"moe_gmm: implementation 'triton' needs an NVIDIA GPU (this backend is "
                     f"{jax.default_backend()}); pass interpret=True to run it on the CPU, or "
                     "use 'xla'")
  return implementation


def _check(lhs, rhs, group_sizes):
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f'moe_gmm: want lhs [m, k] and rhs [groups, k, n], got {lhs.shape} and '
                     f'{rhs.shape}')
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'moe_gmm: group_sizes must be integers of shape ({rhs.shape[0]},), got '
                     f'{group_sizes.dtype}{list(group_sizes.shape)}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _triton_gmm(lhs, rhs, group_sizes, out_dtype, tiling):
  return triton_impl.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype, **tiling)


def _triton_gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling):
  return _triton_gmm(lhs, rhs, group_sizes, out_dtype, tiling), (lhs, rhs, group_sizes)


def _triton_gmm_bwd(out_dtype, tiling, residuals, grad):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  grad = grad.astype(lhs.dtype)
  # d_lhs = grad @ rhs[group]ᵀ: the same kernel reading rhs transposed, no copy of rhs.
  d_lhs = triton_impl.gmm(grad, rhs, group_sizes, transpose_rhs=True,
                          preferred_element_type=lhs.dtype, **tiling)
  d_rhs = triton_impl.tgmm(lhs, grad, group_sizes, preferred_element_type=rhs.dtype, **tiling)
  return d_lhs, d_rhs, None


_triton_gmm.defvjp(_triton_gmm_fwd, _triton_gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        implementation: str | None = None, preferred_element_type=None,
        tiling: dict | None = None, interpret: bool = False) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)] for rows sorted by group; rows past sum(group_sizes) are 0.

  lhs [m, k], rhs [groups, k, n], group_sizes [groups] integers. Accumulates in fp32;
  returns `preferred_element_type` (default: lhs's dtype). `tiling` overrides
  triton.DEFAULT_TILING (block_m/n/k, num_warps, num_stages).
  """
  _check(lhs, rhs, group_sizes)
  impl = _resolve(implementation, interpret)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if impl == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                              preferred_element_type=out_dtype)
  if impl == 'reference':
    return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  tiles = {**triton_impl.DEFAULT_TILING, **(tiling or {}), 'interpret': interpret}
  return _triton_gmm(lhs, rhs, group_sizes, out_dtype, _Frozen(tiles))


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         implementation: str | None = None, preferred_element_type=None,
         tiling: dict | None = None, interpret: bool = False) -> jax.Array:
  """out[i] = lhs[rows of i]ᵀ @ grad[rows of i], [groups, k, n]: gmm's weight gradient."""
  impl = _resolve(implementation, interpret)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if impl == 'triton':
    tiles = {**triton_impl.DEFAULT_TILING, **(tiling or {}), 'interpret': interpret}
    return triton_impl.tgmm(lhs, grad, group_sizes, preferred_element_type=out_dtype, **tiles)
  if impl == 'reference':
    return reference.tgmm(lhs, grad, group_sizes, preferred_element_type=out_dtype)
  # XLA: the weight gradient of ragged_dot, which is exactly this product.
  weights = jnp.zeros((group_sizes.shape[0], lhs.shape[1], grad.shape[1]), lhs.dtype)
  _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(lhs, w, group_sizes.astype(jnp.int32),
                                                preferred_element_type=grad.dtype), weights)
  return vjp(grad)[0].astype(out_dtype)


class _Frozen(dict):
  """A hashable dict: custom_vjp's non-differentiable arguments must hash."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))
