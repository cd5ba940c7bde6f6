"""Grouped matmuls in Pallas with the Mosaic GPU backend: the Hopper path (TMA + wgmma).

Both kernels are persistent: one program per SM walks a list of output tiles (`plgpu.nd_loop`
over the "sm" axis), and each tile runs a software pipeline (`plgpu.emit_pipeline`) that
streams operand blocks into shared memory by TMA, `max_concurrent_steps` blocks ahead, while
the warpgroup's asynchronous wgmma accumulates in registers (fp32).

gmm: the output tiles are (tile-group pair, column tile) as in common.py: a row tile that
straddles a group boundary is computed once per group it touches. The tiles are walked in
bands of `band` pairs, column-major inside a band, so the SMs busy at one time share a few
row tiles of `lhs` and a few groups' weights in L2 (the "grouped ordering" of tiled matmuls).
A tile writes back only its group's rows: TMA stores need a static row count, so the count is
split into its binary digits and one store issued per set bit (at most log2(block_m) + 1).

gmm with consumers=2 is warp-specialised (`plgpu.emit_pipeline_warp_specialized`): a
producer warpgroup issues the TMA loads while two consumer warpgroups each multiply half of
the tile's rows; a consumer whose half holds none of the tile's group skips its wgmmas.

tgmm: the output tiles are (group, k tile, n tile) of out[g, k, n]; each pipelines over its
group's row blocks, zeroing in shared memory the rows of neighbouring groups in the first and
last block before the wgmma reads them.

Operands must be 16-bit floats of one dtype (wgmma's bf16/fp16 path). Their shapes need not
be multiples of the blocks: m, k and n are padded here when they are not, which copies the
operand, so the model's shapes should be (MoE row counts, tokens × top-k, usually are).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.moe_gmm import common

DEFAULT_TILING = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, band=8)
DEFAULT_TGMM_TILING = dict(block_m=64, block_n=128, block_k=128, max_concurrent_steps=4)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Programs the CPU interpreter simulates: a few, so persistence (several tiles per program)
# is exercised without simulating 132 SMs.
_INTERPRET_PROGRAMS = 3


def interpret_params(interpret=True, **options):
  """The GPU interpreter's parameters (Mosaic GPU kernels run on the CPU, simulating shared
  memory, TMA and barriers), or None to compile for the GPU.

  interpret: False; True, for an `InterpretGPUParams` of `options` (e.g. detect_races=True);
  or an `InterpretGPUParams`, passed on as given. jax 0.11 exports the class as
  `plgpu.InterpretGPUParams`; jax 0.10 has it only under `jax._src`.
  """
  if interpret is not True and options:
    raise ValueError(f'moe_gmm mosaic_gpu: interpreter options {sorted(options)} need '
                     f'interpret=True, got interpret={interpret!r}')
  if interpret is False or interpret is None:
    return None
  if interpret is not True:
    return interpret
  cls = getattr(plgpu, 'InterpretGPUParams', None)
  if cls is None:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
    cls = params.InterpretGPUParams
  return cls(**options)


def check_dtypes(*arrays: jax.Array) -> None:
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) != 1 or next(iter(dtypes)) not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"moe_gmm: implementation 'mosaic_gpu' takes bfloat16 or float16 operands "
                     f"of one dtype (wgmma), got {sorted(map(str, dtypes))}; use 'triton' for "
                     "float32")


def _check_blocks(block_m: int, **blocks: int) -> None:
  # wgmma works on 64-row slabs per warpgroup, and the row masks live in its register layout.
  if block_m % 64:
    raise ValueError(f'moe_gmm mosaic_gpu: block_m must be a multiple of 64, got {block_m}')
  for name, size in blocks.items():
    if size % 64:  # the narrowest operand block that keeps the 128-byte swizzle for 16-bit
      raise ValueError(f'moe_gmm mosaic_gpu: {name} must be a multiple of 64, got {size}')


def _num_programs(interpret, num_programs: int | None, programs_per_sm: int) -> int:
  """Persistent programs to launch: one per SM, or `programs_per_sm` when their shared memory
  lets that many share an SM (the hardware then overlaps one's load latency with another's
  wgmmas, which helps short pipelines such as tgmm's small groups)."""
  if programs_per_sm not in (1, 2):
    raise ValueError(f'moe_gmm mosaic_gpu: programs_per_sm must be 1 or 2, got {programs_per_sm}')
  if num_programs:
    return num_programs
  return _INTERPRET_PROGRAMS if interpret else jax.devices()[0].core_count * programs_per_sm


def _swizzled(block_minor: int, dtype) -> tuple:
  """Shared-memory layout wgmma reads without bank conflicts: 8-row tiles, swizzled."""
  swizzle = plgpu.find_swizzle(block_minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _store_rows(o_smem, o_gmem, first_row, row_in_tile, count, block_m, col_slice):
  """Copy rows [row_in_tile, row_in_tile + count) of o_smem to rows first_row + ... of o_gmem.

  TMA takes static shapes, the count is dynamic: one store per set bit of `count`. The
  stores are left in flight; the caller waits before it writes o_smem again.
  """
  done = row_in_tile
  bit = block_m
  while bit:
    @pl.when(count & bit != 0)
    def _(bit=bit, done=done):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(done, bit)],
                              o_gmem.at[pl.ds(first_row + done, bit), col_slice])
    done = done + (count & bit)
    bit //= 2


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        preferred_element_type=None, block_m: int = 128, block_n: int = 128, block_k: int = 64,
        max_concurrent_steps: int = 4, band: int = 8, consumers: int = 1,
        programs_per_sm: int = 1, num_programs: int | None = None,
        interpret=False) -> jax.Array:
  """lhs [m, k] (rows sorted by group), rhs [g, k, n] (or [g, n, k] with transpose_rhs).

  consumers: 1, one warpgroup issues both the TMA loads and the wgmmas of a tile; 2, the
  warp-specialised body (module docstring): straddling tiles then cost about the 64-row
  halves they use rather than the whole tile.
  interpret: run on the CPU interpreter (True, or parameters: `interpret_params`).
  """
  check_dtypes(lhs, rhs)
  if consumers not in (1, 2):
    raise ValueError(f'moe_gmm mosaic_gpu: consumers must be 1 or 2, got {consumers}')
  _check_blocks(block_m // consumers, block_n=block_n, block_k=block_k)
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  lhs_p = common.pad_to(common.pad_to(lhs, 0, block_m), 1, block_k)
  rhs_p = common.pad_to(common.pad_to(rhs, 2 if transpose_rhs else 1, block_k),
                        1 if transpose_rhs else 2, block_n)
  m_p, k_p = lhs_p.shape
  n_p = -(-n // block_n) * block_n
  grid_n, k_steps = n_p // block_n, k_p // block_k
  # The output has exactly m rows (the stores write only rows of a group, or of the virtual
  # group that ends at m), so a row count that is not a tile multiple costs no slicing copy
  # of the output; only lhs is padded, for its TMA loads of whole tiles.
  starts, ends = common.group_bounds(group_sizes, m)
  pair_group, pair_tile = common.tile_group_pairs(starts, ends, m_p, block_m)
  num_pairs = pair_group.shape[0]
  lhs_layout = _swizzled(block_k, lhs.dtype)
  rhs_layout = _swizzled(block_k if transpose_rhs else block_n, rhs.dtype)
  # rhs [g, n, k] when transposed: its block is read (column tile, k step), wgmma transposes.
  rhs_block = (block_n, block_k) if transpose_rhs else (block_k, block_n)
  rhs_index = ((lambda s, col: (col, s)) if transpose_rhs else (lambda s, col: (s, col)))

  def body(group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
    # The output tile's staging buffer lives outside the tile loop, so that no pipeline buffer
    # of the next tile aliases it: a tile's stores stay in flight while the next tile computes,
    # and are waited for only before the buffer is written again. Unswizzled, so that a store
    # may start at any row of the tile.
    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), out_dtype))
    def _(o_smem):
      @plgpu.nd_loop((num_pairs * grid_n,), collective_axes='sm')
      def _(loop):
        pair, col = common.banded(loop.index[0], num_pairs, grid_n, band)
        group = group_ref[pair]

        # Pairs past the last are padding; group num_groups is the virtual one.
        @pl.when(group <= num_groups)
        def _():
          tile = tile_ref[pair]
          row0 = tile * block_m
          lo = jnp.maximum(starts_ref[group], row0)
          hi = jnp.minimum(ends_ref[group], row0 + block_m)
          weights = jnp.minimum(group, num_groups - 1)
          # The virtual group (rows of no group) runs no steps: its tile stores zeros.
          steps = k_steps * (group < num_groups).astype(jnp.int32)

          def accumulate(acc_ref):
            def step(_, a_smem, b_smem):
              b = b_smem.T if transpose_rhs else b_smem
              plgpu.wgmma(acc_ref, a_smem, b)

            plgpu.emit_pipeline(
                step, grid=(steps,), max_concurrent_steps=max_concurrent_steps,
                in_specs=[
                    plgpu.BlockSpec((block_m, block_k), lambda s: (tile, s),
                                    transforms=lhs_layout, delay_release=1),
                    plgpu.BlockSpec(rhs_block, functools.partial(rhs_index, col=col),
                                    transforms=rhs_layout, delay_release=1),
                ],
            )(lhs_ref, rhs_ref.at[weights])
            return acc_ref[...]

          acc = pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n)))
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores
          o_smem[...] = acc.astype(out_dtype)
          plgpu.commit_smem()
          _store_rows(o_smem, out_ref, row0, lo - row0, hi - lo, block_m,
                      pl.ds(col * block_n, block_n))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  if consumers == 2:
    body = _warp_specialized_gmm_body(
        num_groups=num_groups, num_pairs=num_pairs, grid_n=grid_n, k_steps=k_steps,
        block_m=block_m, block_n=block_n, block_k=block_k, band=band,
        max_concurrent_steps=max_concurrent_steps, transpose_rhs=transpose_rhs,
        out_dtype=out_dtype, lhs_layout=lhs_layout, rhs_layout=rhs_layout, rhs_block=rhs_block)
  threads = dict(num_threads=3, thread_name='wg') if consumers == 2 else {}
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n_p), out_dtype),
      grid=(_num_programs(interpret, num_programs, programs_per_sm),), grid_names=('sm',),
      **threads,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret))
  out = kernel(pair_group, pair_tile, starts, ends, lhs_p, rhs_p)
  return out if n_p == n else out[:, :n]


def _warp_specialized_gmm_body(*, num_groups, num_pairs, grid_n, k_steps, block_m, block_n,
                               block_k, band, max_concurrent_steps, transpose_rhs, out_dtype,
                               lhs_layout, rhs_layout, rhs_block):
  """gmm's kernel body with a producer and two consumer warpgroups (axis 'wg': 0, 1 consume,
  2 produces), each consumer owning block_m / 2 rows of every tile."""
  half = block_m // 2

  def body(group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
    wg = lax.axis_index('wg')

    def rhs_columns(ref, col):  # one group's weights, the tile's columns
      cols = pl.ds(col * block_n, block_n)
      return ref.at[cols, :] if transpose_rhs else ref.at[:, cols]

    def pipeline(step, context):
      return plgpu.emit_pipeline_warp_specialized(
          step, grid=(k_steps,), memory_registers=40, wg_axis='wg', num_compute_wgs=2,
          max_concurrent_steps=max_concurrent_steps, compute_context=context,
          in_specs=[
              plgpu.BlockSpec((block_m, block_k), lambda s: (0, s), transforms=lhs_layout),
              plgpu.BlockSpec(rhs_block, (lambda s: (0, s)) if transpose_rhs else
                              (lambda s: (s, 0)), transforms=rhs_layout),
          ])

    ignore = lambda *_, **__: None  # noqa: E731  (allocations depend on the specs alone)
    allocations = pipeline(ignore, ignore).get_allocations(
        lhs_ref.at[pl.ds(0, block_m)], rhs_columns(rhs_ref.at[0], 0))

    # As in the one-warpgroup body, the staging buffers outlive the tile loop so that stores
    # overlap the next tile; one per consumer.
    @functools.partial(pl.run_scoped, allocations=allocations,
                       o_smem=plgpu.SMEM((2, half, block_n), out_dtype), collective_axes='wg')
    def _(allocations, o_smem):
      @plgpu.nd_loop((num_pairs * grid_n,), collective_axes='sm')
      def _(loop):
        pair, col = common.banded(loop.index[0], num_pairs, grid_n, band)
        group = group_ref[pair]
        bound = jnp.minimum(group, num_groups)
        slab0 = tile_ref[pair] * block_m + jnp.minimum(wg, 1) * half  # this consumer's rows
        lo = jnp.clip(starts_ref[bound] - slab0, 0, half)
        hi = jnp.clip(ends_ref[bound] - slab0, 0, half)
        columns = pl.ds(col * block_n, block_n)

        def store(acc):
          slot = o_smem.at[jnp.minimum(wg, 1)]
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this consumer's previous stores
          slot[...] = acc.astype(out_dtype)
          plgpu.commit_smem()
          _store_rows(slot, out_ref, slab0, lo, hi - lo, half, columns)

        def context(run):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half, block_n)))
          def _(acc_ref):
            run(acc_ref)
            store(acc_ref[...])

        def step(_, a_smem, b_smem, acc_ref):
          @pl.when(hi > lo)  # nothing of this group in my half: leave the tensor cores to the other
          def _():
            b = b_smem.T if transpose_rhs else b_smem
            plgpu.wgmma(acc_ref, a_smem.at[pl.ds(jnp.minimum(wg, 1) * half, half)], b)
            plgpu.wgmma_wait(0)
          return acc_ref

        @pl.when(group < num_groups)
        def _():
          weights = rhs_ref.at[jnp.minimum(group, num_groups - 1)]
          pipeline(step, context)(lhs_ref.at[pl.ds(tile_ref[pair] * block_m, block_m)],
                                  rhs_columns(weights, col), allocations=allocations)

        @pl.when((group == num_groups) & (wg < 2))  # rows of no group: zeros
        def _():
          store(jnp.zeros((half, block_n), jnp.float32))

      @pl.when(wg < 2)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return body


def _tgmm_tile(index, grid_k, grid_n):
  """(group, k tile, n tile) of tgmm's output tile `index`: group-major, so the programs
  resident at one time share a group's rows of lhs and grad in L2."""
  group, rest = jnp.divmod(index, grid_k * grid_n)
  return (group, *jnp.divmod(rest, grid_n))


def _zero_rows_outside(a_smem, first_row, start, end):
  """Rows of the shared-memory tile a_smem (rows first_row + i) outside [start, end) set to
  zero, through registers in wgmma's layout; fenced for the wgmma that reads it next."""
  rows = first_row + plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, a_smem.shape, 0),
                                       plgpu.Layout.WGMMA)
  keep = (rows >= start) & (rows < end)
  a_smem[...] = jnp.where(keep, a_smem[...], jnp.zeros_like(a_smem[...]))
  plgpu.commit_smem()


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
         block_m: int = 64, block_n: int = 128, block_k: int = 128,
         max_concurrent_steps: int = 4, consumers: int = 1, programs_per_sm: int = 1,
         num_programs: int | None = None, interpret=False) -> jax.Array:
  """out[i] = lhs[rows of i]ᵀ @ grad[rows of i]: [g, k, n]; zero for empty groups.

  block_m: rows per pipeline step (the contraction); block_k × block_n: the output tile.
  consumers: 1, one warpgroup; 2, warp-specialised: a producer warpgroup streams the blocks
  and two consumers each own block_k / 2 rows of the output tile, so a tile holds twice the
  work of one warpgroup's (a small group gives each tile only a few row blocks, and every
  tile pays its pipeline's start). The walk is group-major: resident programs share a
  group's rows in L2.
  interpret: as for gmm.
  """
  check_dtypes(lhs, grad)
  if consumers not in (1, 2):
    raise ValueError(f'moe_gmm mosaic_gpu: consumers must be 1 or 2, got {consumers}')
  _check_blocks(block_m, block_n=block_n, block_k=block_k // consumers)
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  lhs_p = common.pad_to(common.pad_to(lhs, 0, block_m), 1, block_k)
  grad_p = common.pad_to(common.pad_to(grad, 0, block_m), 1, block_n)
  starts, ends = common.group_bounds(group_sizes, lhs_p.shape[0])
  starts, ends = starts[:num_groups], ends[:num_groups]
  k_p, n_p = lhs_p.shape[1], grad_p.shape[1]
  grid_k, grid_n = k_p // block_k, n_p // block_n
  lhs_layout = _swizzled(block_k, lhs.dtype)
  grad_layout = _swizzled(block_n, grad.dtype)
  out_layout = _swizzled(block_n, out_dtype)

  def body(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
    # Outside the tile loop, as in gmm: a tile's store overlaps the next tile's pipeline.
    @functools.partial(pl.run_scoped,
                       o_smem=plgpu.SMEM((block_k, block_n), out_dtype, transforms=out_layout))
    def _(o_smem):
      @plgpu.nd_loop((num_groups * grid_k * grid_n,), collective_axes='sm')
      def _(loop):
        group, ki, ni = _tgmm_tile(loop.index[0], grid_k, grid_n)
        start, end = starts_ref[group], ends_ref[group]
        # Empty groups run no steps and store their zero tile.
        first, blocks = common.row_blocks(start, end, block_m)

        def accumulate(acc_ref):
          def step(s, a_smem, b_smem):
            block = first + s[0]

            @pl.when((block * block_m < start) | ((block + 1) * block_m > end))
            def _():
              _zero_rows_outside(a_smem, block * block_m, start, end)

            plgpu.wgmma(acc_ref, a_smem.T, b_smem)

          plgpu.emit_pipeline(
              step, grid=(blocks,), max_concurrent_steps=max_concurrent_steps,
              in_specs=[
                  plgpu.BlockSpec((block_m, block_k), lambda s: (first + s, ki),
                                  transforms=lhs_layout, delay_release=1),
                  plgpu.BlockSpec((block_m, block_n), lambda s: (first + s, ni),
                                  transforms=grad_layout, delay_release=1),
              ],
          )(lhs_ref, grad_ref)
          return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((block_k, block_n)))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[group, pl.ds(ki * block_k, block_k),
                                                   pl.ds(ni * block_n, block_n)])

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  if consumers == 2:
    body = _warp_specialized_tgmm_body(
        num_groups=num_groups, grid_k=grid_k, grid_n=grid_n, block_m=block_m, block_k=block_k,
        block_n=block_n, max_concurrent_steps=max_concurrent_steps, out_dtype=out_dtype,
        lhs_layout=lhs_layout, grad_layout=grad_layout,
        out_layout=_swizzled(block_n, out_dtype))
  threads = dict(num_threads=3, thread_name='wg') if consumers == 2 else {}
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((num_groups, k_p, n_p), out_dtype),
      grid=(_num_programs(interpret, num_programs, programs_per_sm),), grid_names=('sm',),
      **threads,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret))
  return kernel(starts, ends, lhs_p, grad_p)[:, :k, :n]


def _warp_specialized_tgmm_body(*, num_groups, grid_k, grid_n, block_m, block_k, block_n,
                                max_concurrent_steps, out_dtype, lhs_layout, grad_layout,
                                out_layout):
  """tgmm's kernel body with a producer and two consumer warpgroups (axis 'wg': 0, 1 consume,
  2 produces); consumer c owns output rows [c, c + 1) · block_k / 2 of every tile, i.e. the
  same columns of the lhs block."""
  half = block_k // 2

  def body(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
    wg = lax.axis_index('wg')
    me = jnp.minimum(wg, 1)  # the producer's value is unused

    def pipeline(step, context, blocks, first, ki, ni):
      return plgpu.emit_pipeline_warp_specialized(
          step, grid=(blocks,), memory_registers=40, wg_axis='wg', num_compute_wgs=2,
          max_concurrent_steps=max_concurrent_steps, compute_context=context,
          in_specs=[
              plgpu.BlockSpec((block_m, block_k), lambda s: (first + s, ki),
                              transforms=lhs_layout),
              plgpu.BlockSpec((block_m, block_n), lambda s: (first + s, ni),
                              transforms=grad_layout),
          ])

    ignore = lambda *_, **__: None  # noqa: E731  (allocations depend on the specs alone)
    # A static grid of max_concurrent_steps: no fewer slots than the dynamic grids below get.
    allocations = pipeline(ignore, ignore, max_concurrent_steps, 0, 0, 0).get_allocations(
        lhs_ref, grad_ref)

    @functools.partial(pl.run_scoped, allocations=allocations,
                       o_smem=plgpu.SMEM((2, half, block_n), out_dtype, transforms=out_layout),
                       collective_axes='wg')
    def _(allocations, o_smem):
      @plgpu.nd_loop((num_groups * grid_k * grid_n,), collective_axes='sm')
      def _(loop):
        group, ki, ni = _tgmm_tile(loop.index[0], grid_k, grid_n)
        start, end = starts_ref[group], ends_ref[group]
        first, blocks = common.row_blocks(start, end, block_m)
        mine = pl.ds(me * half, half)  # my columns of the lhs block = my rows of the output

        def context(run):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half, block_n)))
          def _(acc_ref):
            run(acc_ref)
            slot = o_smem.at[me]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # my previous tile's store
            slot[...] = acc_ref[...].astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(slot, out_ref.at[group, pl.ds(ki * block_k + me * half, half),
                                                     pl.ds(ni * block_n, block_n)])

        def step(s, a_smem, b_smem, acc_ref):
          block = first + s[0]
          a_mine = a_smem.at[:, mine]

          # Each consumer zeroes the other groups' rows in its own columns only: the two
          # write disjoint parts of the shared block.
          @pl.when((block * block_m < start) | ((block + 1) * block_m > end))
          def _():
            _zero_rows_outside(a_mine, block * block_m, start, end)

          plgpu.wgmma(acc_ref, a_mine.T, b_smem)
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(step, context, blocks, first, ki, ni)(lhs_ref, grad_ref,
                                                       allocations=allocations)

      @pl.when(wg < 2)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return body
