"""Row and tile bookkeeping shared by the grouped-matmul kernels (Triton and Mosaic GPU).

Rows of `lhs` are sorted by group. A row tile of `block_m` rows that straddles a group boundary
is processed once per group it touches, each time keeping only its own group's rows (the
megablox scheme), so no group is padded to the tile size. A virtual last group covers the
rows past sum(group_sizes), whose outputs are zero.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Row [start, end) of each group, plus the virtual group [sum(sizes), m): g + 1 entries."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  starts = ends - group_sizes.astype(jnp.int32)
  return (jnp.concatenate([starts, ends[-1:]]),
          jnp.concatenate([ends, jnp.array([m], jnp.int32)]))


def tile_group_pairs(starts: jax.Array, ends: jax.Array, m: int, block_m: int
                     ) -> tuple[jax.Array, jax.Array]:
  """(group, row tile) of every non-empty intersection, padded with group = len(starts).

  The static count tiles_m + groups bounds them: each group adds at most one tile more than
  the tiles it fully covers.
  """
  num = starts.shape[0]
  sizes = ends - starts
  first = starts // block_m
  count = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
  cum = jnp.cumsum(count)
  pairs = pl.cdiv(m, block_m) + num
  p = jnp.arange(pairs, dtype=jnp.int32)
  group = jnp.searchsorted(cum, p, side='right').astype(jnp.int32)
  safe = jnp.minimum(group, num - 1)
  tile = first[safe] + p - (cum[safe] - count[safe])
  return group, jnp.where(group < num, tile, 0).astype(jnp.int32)


def banded(index: jax.Array, num_rows: int, num_cols: int, band: int):
  """(row, column) of tile `index` when a num_rows × num_cols grid of output tiles is walked in
  bands of `band` rows, column-major inside a band (the rows vary fastest).

  The programs resident at one time then cover a few rows × a few columns instead of many
  rows × one column: each row tile of lhs, and each column of the weights those rows use, is
  read from HBM about once and then served from L2 (the "grouped ordering" of tiled matmuls).
  """
  per_band = band * num_cols
  first_row = (index // per_band) * band
  rows_here = jnp.minimum(band, num_rows - first_row)  # the last band may be short
  within = index % per_band
  return first_row + within % rows_here, within // rows_here


def row_blocks(start: jax.Array, end: jax.Array, block_m: int) -> tuple[jax.Array, jax.Array]:
  """(first, count) of the block_m-row blocks that rows [start, end) touch; count 0 if empty.

  The count is a product with the non-empty flag, not a select: Pallas' Triton lowering of a
  scalar select gave a loop an i1 bound that Triton rejects ("scf.for ... same type"; seen on
  an H100, reproduced by lowering on CPU), so every kernel takes its trip count from here.
  """
  first = start // block_m
  return first, ((end - 1) // block_m - first + 1) * (end > start).astype(jnp.int32)
