"""The specification of the grouped matmuls, in plain jnp.

Rows of `lhs` are sorted by group: group i owns rows [offset_i, offset_i + group_sizes[i]),
offsets being the running sum of group_sizes. Rows past sum(group_sizes) belong to no group.
"""

import jax
import jax.numpy as jnp


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
