"""The specification of the grouped matmuls, in plain jnp.

Rows of `lhs` are sorted by group: group i owns rows [offset_i, offset_i + group_sizes[i]),
offsets being the running sum of group_sizes. Rows past sum(group_sizes) belong to no group.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def group_masks(group_sizes: jax.Array, m: int) -> jax.Array:
  """[groups, m] booleans: row r belongs to group i."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = jnp.arange(m)
  return (rows[None] >= starts[:, None]) & (rows[None] < ends[:, None])


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
        preferred_element_type=None) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)]; zero for rows of no group. lhs [m, k], rhs [g, k, n]."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_masks(group_sizes, lhs.shape[0])
  per_group = jnp.einsum('mk,gkn->gmn', lhs, rhs, preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(masks[:, :, None], per_group, 0.0), axis=0).astype(out_dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array,
         preferred_element_type=None) -> jax.Array:
  """out[i] = lhs[rows of i]ᵀ @ grad[rows of i]: [g, k, n]. lhs [m, k], grad [m, n]."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_masks(group_sizes, lhs.shape[0])
  masked = jnp.where(masks[:, :, None], lhs[None], 0)
  return jnp.einsum('gmk,mn->gkn', masked, grad,
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _window(group_sizes: np.ndarray) -> int:
  """Rows each group's matmul covers: the largest group rounded up to a power of two, so one
  compiled loop serves every distribution of the same rows (not one compile per group size,
  which at 256 groups cost minutes of device time in the benchmark)."""
  return 1 << max(int(np.max(group_sizes, initial=0)) - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=('window', 'transpose_rhs'))
def _gmm_by_windows(lhs, rhs, starts, sizes, *, window, transpose_rhs):
  m, width = lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]
  # Padded by a window, so no group's window is clamped back over its neighbours.
  lhs = jnp.pad(lhs, ((0, window), (0, 0)))

  def one_group(i, out):
    rows = jax.lax.dynamic_slice_in_dim(lhs, starts[i], window)
    rows = jnp.where((jnp.arange(window) < sizes[i])[:, None], rows, 0)
    w = rhs[i].T if transpose_rhs else rhs[i]
    product = jnp.dot(rows, w, preferred_element_type=jnp.float32)
    # The window's rows past the group are zero, so adding keeps the neighbours' rows exact.
    return jax.lax.dynamic_update_slice_in_dim(
        out, jax.lax.dynamic_slice_in_dim(out, starts[i], window) + product, starts[i], 0)

  out = jax.lax.fori_loop(0, rhs.shape[0], one_group,
                          jnp.zeros((m + window, width), jnp.float32))
  return out[:m]


@functools.partial(jax.jit, static_argnames=('window',))
def _tgmm_by_windows(lhs, grad, starts, sizes, *, window):
  lhs = jnp.pad(lhs, ((0, window), (0, 0)))
  grad = jnp.pad(grad, ((0, window), (0, 0)))

  def one_group(i, out):
    keep = (jnp.arange(window) < sizes[i])[:, None]
    rows = jnp.where(keep, jax.lax.dynamic_slice_in_dim(lhs, starts[i], window), 0)
    grads = jnp.where(keep, jax.lax.dynamic_slice_in_dim(grad, starts[i], window), 0)
    return out.at[i].set(jnp.dot(rows.T, grads, preferred_element_type=jnp.float32))

  groups = starts.shape[0]
  return jax.lax.fori_loop(0, groups, one_group,
                           jnp.zeros((groups, lhs.shape[1], grad.shape[1]), jnp.float32))


def gmm_by_slices(lhs: jax.Array, rhs: jax.Array, group_sizes: np.ndarray, *,
                  transpose_rhs: bool = False) -> jax.Array:
  """gmm with concrete group sizes, one plain matmul per group on its rows: fp32 [m, n].

  The same product as `gmm` without its [groups, m, n] intermediate, so it serves as the exact
  result at real MoE shapes (the autotuner's check, the benchmark's). rhs is [g, n, k] with
  transpose_rhs. Each group's matmul covers a fixed window of rows (the rows past the group
  masked to zero): one compile per shape, whatever the sizes.
  """
  sizes = np.asarray(group_sizes, np.int64)
  starts = np.cumsum(sizes) - sizes
  return _gmm_by_windows(lhs, rhs, jnp.asarray(starts, jnp.int32), jnp.asarray(sizes, jnp.int32),
                         window=_window(sizes), transpose_rhs=transpose_rhs)


def tgmm_by_slices(lhs: jax.Array, grad: jax.Array, group_sizes: np.ndarray) -> jax.Array:
  """tgmm with concrete group sizes, one plain matmul per group: fp32 [g, k, n]."""
  sizes = np.asarray(group_sizes, np.int64)
  starts = np.cumsum(sizes) - sizes
  return _tgmm_by_windows(lhs, grad, jnp.asarray(starts, jnp.int32),
                          jnp.asarray(sizes, jnp.int32), window=_window(sizes))
