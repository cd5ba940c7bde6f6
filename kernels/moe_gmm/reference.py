"""The specification of the grouped matmuls, in plain jnp.

Rows of `lhs` are sorted by group: group i owns rows [offset_i, offset_i + group_sizes[i]),
offsets being the running sum of group_sizes. Rows past sum(group_sizes) belong to no group.
"""

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


def gmm_by_slices(lhs: jax.Array, rhs: jax.Array, group_sizes: np.ndarray, *,
                  transpose_rhs: bool = False) -> jax.Array:
  """gmm with concrete group sizes, one plain matmul per group on its slice: fp32 [m, n].

  The same product as `gmm` without its [groups, m, n] intermediate, so it serves as the exact
  result at real MoE shapes (the autotuner's check, the benchmark's). rhs is [g, n, k] with
  transpose_rhs.
  """
  ends = np.cumsum(group_sizes)
  parts = [jnp.dot(lhs[end - size:end], rhs[i].T if transpose_rhs else rhs[i],
                   preferred_element_type=jnp.float32)
           for i, (size, end) in enumerate(zip(group_sizes, ends))]
  width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  parts.append(jnp.zeros((lhs.shape[0] - int(ends[-1]), width), jnp.float32))
  return jnp.concatenate(parts)


def tgmm_by_slices(lhs: jax.Array, grad: jax.Array, group_sizes: np.ndarray) -> jax.Array:
  """tgmm with concrete group sizes, one plain matmul per group: fp32 [g, k, n]."""
  ends = np.cumsum(group_sizes)
  return jnp.stack([jnp.dot(lhs[end - size:end].T, grad[end - size:end],
                            preferred_element_type=jnp.float32)
                    for size, end in zip(group_sizes, ends)])
