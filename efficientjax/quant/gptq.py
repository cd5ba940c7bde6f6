"""GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1) for one matrix.

The paper's columns are our kernel's input rows: w [in, out], H = 2·XᵀX/N [in, in] over the
calibration tokens' inputs to the layer. Rows are quantised one at a time, in order; each
one's rounding error, divided by the diagonal of the upper Cholesky factor U of H⁻¹, is pushed
onto the rows not yet quantised through U's row (the OBS update). As in the paper and its
reference code (github.com/IST-DASLab/gptq, `fasterquant`):

- dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed;
- dampening: λ = damp · mean(diag H) added to the diagonal (damp = 0.01);
- lazy batch updates: within a block of `block_size` rows the update stays in the block; the
  rest of the matrix receives the block's errors at once (§3 "Step 2");
- groupwise scales are computed when a group starts. Blocks are made a multiple of the group
  size, so a group never straddles two blocks and its scale is computed from its rows as they
  stand after every earlier row's update (exactly the unbatched algorithm). The reference reads
  the group from `W`, where a group that starts mid-block misses that block's updates so far;
  we do not copy that staleness (the two agree when group_size = block_size).
- per-channel scales (group_size = in, and always with act_order) are computed once, up front,
  from the matrix (dead rows zeroed): the reference's `static_groups`;
- act_order: rows in order of decreasing H_ii (stable), with static groups, so the stored
  format keeps contiguous groups (no g_idx).

Everything runs in float32 with HIGHEST matmul precision (no TF32 on GPUs).
"""

import functools

import jax
import jax.numpy as jnp

from efficientjax.quant.formats import int_codes, int_dequantize, int_params

HIGHEST = jax.lax.Precision.HIGHEST


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  h_inv = (h_inv + h_inv.T) / 2  # symmetric to the last bit before the second factorisation
  return jnp.linalg.cholesky(h_inv).T


def block_size_for(group_size: int, n_in: int, block_size: int = 128) -> int:
  """The block actually used: a multiple of the group size (groups never straddle blocks)."""
  if group_size >= n_in:
    return block_size
  return group_size * max(1, block_size // group_size)


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'symmetric', 'block_size',
                                             'act_order', 'damp', 'scale_dtype'))
def gptq(w: jax.Array, hessian: jax.Array, *, bits: int, group_size: int, symmetric: bool,
         block_size: int = 128, act_order: bool = False, damp: float = 0.01,
         scale_dtype='bfloat16') -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """w [in, out], hessian [in, in] -> (codes [in, out] float32 as `formats.rtn` gives them,
  scales [in/group_size, out] float32 (rounded to scale_dtype), zeros like scales or None)."""
  n_in, n_out = w.shape
  if n_in % group_size:
    raise ValueError(f'group_size {group_size} does not divide the input width {n_in}')
  w = w.astype(jnp.float32)
  h = hessian.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  n_groups = n_in // group_size
  static = act_order or group_size >= n_in
  if static:
    s, z = int_params(w.reshape(n_groups, group_size, n_out), bits, symmetric, scale_dtype)
    static_scales, static_zeros = s[:, 0], None if z is None else z[:, 0]
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(n_in)
  w, h = w[perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n_in, dtype=h.dtype)
  u = _upper_cholesky_of_inverse(h)

  block = block_size_for(group_size, n_in, block_size)
  n_blocks = -(-n_in // block)
  n_pad = n_blocks * block
  pad = n_pad - n_in
  # Padding rows: zero weights, an identity corner of U (no coupling), so they quantise to 0,
  # carry no error and change nothing; dropped at the end.
  w = jnp.pad(w, ((0, pad), (0, 0)))
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n_pad) >= n_in).astype(jnp.float32)
  group_of_row = jnp.pad(perm // group_size, (0, pad))  # a padded row's group is never used
  n_groups_pad = -(-n_pad // group_size)

  def quantize_row(i, w1, u1, scale, zero):
    row = w1[i]
    q = int_codes(row, scale, zero, bits)
    err = (row - int_dequantize(q, scale, zero)) / u1[i, i]
    return q, err, w1 - u1[i][:, None] * err[None, :]

  def block_body(b, carry):
    w_all, q_all, scales, zeros = carry
    start = b * block
    w1 = jax.lax.dynamic_slice(w_all, (start, 0), (block, n_out))
    u1 = jax.lax.dynamic_slice(u, (start, start), (block, block))
    q1 = jnp.zeros_like(w1)
    e1 = jnp.zeros_like(w1)
    if static:
      def row_body(i, c):
        w1, q1, e1 = c
        g = group_of_row[start + i]
        zero = None if static_zeros is None else static_zeros[g]
        q, err, w1 = quantize_row(i, w1, u1, static_scales[g], zero)
        return w1, q1.at[i].set(q), e1.at[i].set(err)
      w1, q1, e1 = jax.lax.fori_loop(0, block, row_body, (w1, q1, e1))
    else:
      def group_body(k, c):
        w1, q1, e1, scales, zeros = c
        first = k * group_size
        scale, zero = int_params(jax.lax.dynamic_slice(w1, (first, 0), (group_size, n_out)),
                                 bits, symmetric, scale_dtype)
        scale = scale[0]
        zero = None if zero is None else zero[0]
        g = start // group_size + k
        scales = scales.at[g].set(scale)
        if zero is not None:
          zeros = zeros.at[g].set(zero)

        def row_body(j, c):
          w1, q1, e1 = c
          q, err, w1 = quantize_row(first + j, w1, u1, scale, zero)
          return w1, q1.at[first + j].set(q), e1.at[first + j].set(err)
        w1, q1, e1 = jax.lax.fori_loop(0, group_size, row_body, (w1, q1, e1))
        return w1, q1, e1, scales, zeros
      w1, q1, e1, scales, zeros = jax.lax.fori_loop(
          0, block // group_size, group_body, (w1, q1, e1, scales, zeros))
    # The block's errors reach the rows after it at once (the lazy batch update); U is upper
    # triangular, so rows before the block get nothing, and the block's own rows in w_all are
    # stale but never read again.
    u_rows = jax.lax.dynamic_slice(u, (start, 0), (block, n_pad))
    w_all = w_all - jnp.matmul(u_rows.T, e1, precision=HIGHEST)
    q_all = jax.lax.dynamic_update_slice(q_all, q1, (start, 0))
    return w_all, q_all, scales, zeros

  scales0 = jnp.zeros((n_groups_pad, n_out), jnp.float32)
  zeros0 = None if (symmetric or static) else jnp.zeros((n_groups_pad, n_out), jnp.float32)
  _, q, scales, zeros = jax.lax.fori_loop(
      0, n_blocks, block_body, (w, jnp.zeros((n_pad, n_out), jnp.float32), scales0, zeros0))
  q = q[:n_in][jnp.argsort(perm)]
  if static:
    return q, static_scales, static_zeros
  return q, scales[:n_groups], None if zeros is None else zeros[:n_groups]
