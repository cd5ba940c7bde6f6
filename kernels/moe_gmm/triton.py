"""Grouped matmuls in Pallas with the Triton backend: the portable GPU path.

gmm: the grid runs over (tile-group pairs, column tiles). Rows are tiled by `block_m`; a row
tile that straddles a group boundary appears once per group it touches, each program masking
the rows of its own group (the megablox scheme), so no group needs padding to the tile size.
A virtual last group covers the rows past sum(group_sizes) and writes their zeros.

tgmm: the grid runs over (groups, k tiles, n tiles); each program walks its group's row tiles.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.moe_gmm import common

DEFAULT_TILING = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
_ANY = pl.BlockSpec(memory_space=pl.ANY)


def _gmm_kernel(group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                num_groups, block_m, block_n, block_k, k_steps, transpose_rhs, band, num_pairs,
                grid_n):
  if band is None:
    pair, col = pl.program_id(0), pl.program_id(1)
  else:
    pair, col = common.banded(pl.program_id(0), num_pairs, grid_n, band)
  group, tile = group_ref[pair], tile_ref[pair]
  bound = jnp.minimum(group, num_groups)  # num_groups is the virtual (zero) group
  rows = tile * block_m + jnp.arange(block_m)
  in_group = (rows >= starts_ref[bound]) & (rows < ends_ref[bound]) & (group <= num_groups)
  weights = jnp.minimum(group, num_groups - 1)
  row_tile = pl.ds(pl.multiple_of(tile * block_m, block_m), block_m)
  col_tile = pl.ds(pl.multiple_of(col * block_n, block_n), block_n)

  def accumulate(i, acc):
    k_tile = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    a = plgpu.load(lhs_ref.at[row_tile, k_tile], mask=in_group[:, None], other=0)
    if transpose_rhs:  # rhs is [g, n_out, k]: the backward pass's rhsᵀ without a copy
      b = plgpu.load(rhs_ref.at[weights, col_tile, k_tile])
      return acc + plgpu.dot(a, b, trans_b=True)
    b = plgpu.load(rhs_ref.at[weights, k_tile, col_tile])
    return acc + plgpu.dot(a, b)

  # The virtual group and padding pairs run no k steps. A multiply, not jnp.where: Pallas'
  # Triton lowering of a scalar select gave the loop an i1 bound that Triton rejects
  # ("scf.for ... same type"; seen on an H100, reproduced by lowering on CPU).
  steps = k_steps * (group < num_groups).astype(jnp.int32)
  acc = jax.lax.fori_loop(jnp.int32(0), steps, accumulate,
                          jnp.zeros((block_m, block_n), jnp.float32))
  plgpu.store(out_ref.at[row_tile, col_tile], acc.astype(out_ref.dtype), mask=in_group[:, None])


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        preferred_element_type=None, block_m: int = 128, block_n: int = 128, block_k: int = 64,
        num_warps: int = 8, num_stages: int = 3, band: int | None = None,
        interpret: bool = False) -> jax.Array:
  """lhs [m, k] (rows sorted by group), rhs [g, k, n] (or [g, n, k] with transpose_rhs).

  band: None launches the (pairs, column tiles) grid as is, pairs fastest: the programs
  resident together read many row tiles of lhs for one column tile each, so lhs passes
  through L2 once per column tile. An int walks bands of `band` pairs column-major
  (common.banded), so resident programs share a few row tiles and their groups' weights.
  """
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = preferred_element_type or lhs.dtype
  lhs_p = common.pad_to(common.pad_to(lhs, 0, block_m), 1, block_k)
  rhs_p = common.pad_to(common.pad_to(rhs, 2 if transpose_rhs else 1, block_k),
                        1 if transpose_rhs else 2, block_n)
  m_p, k_p = lhs_p.shape
  n_p = -(-n // block_n) * block_n
  starts, ends = common.group_bounds(group_sizes, m_p)
  group, tile = common.tile_group_pairs(starts, ends, m_p, block_m)
  num_pairs, grid_n = group.shape[0], n_p // block_n
  kernel = functools.partial(_gmm_kernel, num_groups=num_groups, block_m=block_m,
                             block_n=block_n, block_k=block_k, k_steps=k_p // block_k,
                             transpose_rhs=transpose_rhs, band=band, num_pairs=num_pairs,
                             grid_n=grid_n)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m_p, n_p), out_dtype),
      grid=(num_pairs, grid_n) if band is None else (num_pairs * grid_n,),
      in_specs=[_ANY] * 6, out_specs=_ANY,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='moe_gmm',
  )(group, tile, starts, ends, lhs_p, rhs_p)
  return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, block_m, block_k, block_n,
                 group_major):
  if group_major:
    ni, ki, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  else:
    group, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[group], ends_ref[group]
  first, tiles = common.row_blocks(start, end, block_m)
  k_tile = pl.ds(pl.multiple_of(ki * block_k, block_k), block_k)
  n_tile = pl.ds(pl.multiple_of(ni * block_n, block_n), block_n)

  def accumulate(t, acc):
    r0 = (first + t) * block_m
    rows = r0 + jnp.arange(block_m)
    mask = ((rows >= start) & (rows < end))[:, None]
    row_tile = pl.ds(pl.multiple_of(r0, block_m), block_m)
    x = plgpu.load(lhs_ref.at[row_tile, k_tile], mask=mask, other=0)
    dy = plgpu.load(grad_ref.at[row_tile, n_tile], mask=mask, other=0)
    return acc + plgpu.dot(x, dy, trans_a=True)

  acc = jax.lax.fori_loop(jnp.int32(0), tiles.astype(jnp.int32), accumulate,
                          jnp.zeros((block_k, block_n), jnp.float32))
  plgpu.store(out_ref.at[group, k_tile, n_tile], acc.astype(out_ref.dtype))


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
         block_m: int = 128, block_n: int = 128, block_k: int = 64, num_warps: int = 8,
         num_stages: int = 3, group_major: bool = False, interpret: bool = False) -> jax.Array:
  """out[i] = lhs[rows of i]ᵀ @ grad[rows of i]: [g, k, n]; zero for empty groups.

  group_major: False launches the (groups, k tiles, n tiles) grid with groups fastest, so
  resident programs each read another group's rows; True launches groups slowest, so resident
  programs share one group's rows of lhs and grad in L2.
  """
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  out_dtype = preferred_element_type or lhs.dtype
  lhs_p = common.pad_to(common.pad_to(lhs, 0, block_m), 1, block_k)
  grad_p = common.pad_to(common.pad_to(grad, 0, block_m), 1, block_n)
  starts, ends = common.group_bounds(group_sizes, lhs_p.shape[0])
  k_p, n_p = lhs_p.shape[1], grad_p.shape[1]
  kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n,
                             group_major=group_major)
  tiles = (k_p // block_k, n_p // block_n)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_groups, k_p, n_p), out_dtype),
      grid=(tiles[1], tiles[0], num_groups) if group_major else (num_groups, *tiles),
      in_specs=[_ANY] * 4, out_specs=_ANY,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='moe_tgmm',
  )(starts[:num_groups], ends[:num_groups], lhs_p, grad_p)
  return out[:, :k, :n]
