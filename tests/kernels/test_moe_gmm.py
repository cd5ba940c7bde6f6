"""kernels/moe_gmm against its reference: forward and both gradients, on fresh random inputs.

On CPU the Triton kernels run through Pallas' interpreter at small tiles, and the Mosaic GPU
kernels through jax's GPU interpreter (which simulates shared memory, TMA, barriers and wgmma);
the Mosaic GPU kernels are also lowered for CUDA at real shapes and with every autotuning
candidate, which runs Mosaic's layout inference and its shared-memory budget on this machine.
The GPU runs them compiled at real shapes in experiments/bench_moe_gmm.py (which checks before
it times). test_moe_gmm_races.py runs the Mosaic GPU kernels under jax's race detector.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe_gmm import gmm, ops, reference, tgmm
from tests.kernels import mosaic_interpret

TILES = {
    'triton': dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1),
    # wgmma's smallest row block is 64 (one warpgroup); 64-wide k and n blocks are the
    # narrowest that keep the production 128-byte swizzle.
    'mosaic_gpu': dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, band=2),
    'xla': None,
}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@pytest.fixture(autouse=True)
def _interpretable():
  with mosaic_interpret.interpretable():
    yield


def _groups(kind: str, m: int, g: int, rng) -> np.ndarray:
  if kind == 'random_with_zeros':
    cuts = np.sort(rng.integers(0, m + 1, g - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [m]]))
    sizes[rng.integers(0, g)] = 0
    sizes[-1] += m - sizes.sum()
  elif kind == 'one_group_holds_all':
    sizes = np.zeros(g, np.int64)
    sizes[g // 2] = m
  elif kind == 'short_of_m':  # rows past the groups (token padding) must come out zero
    sizes = np.full(g, (m - 13) // g)
  elif kind == 'skewed':
    sizes = np.floor(rng.dirichlet(np.full(g, 0.3)) * m).astype(np.int64)
    sizes[0] += m - sizes.sum()
  return sizes.astype(np.int32)


def _inputs(dtype, m, k, n, g, kind, seed):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
  return lhs, rhs, jnp.asarray(_groups(kind, m, g, rng)), rng


def _vjp(f, lhs, rhs, cotangent):
  """f(lhs, rhs) and its gradients at `cotangent`, in one jit: op by op, the kernels' wrappers
  and the reference compile each small op for each case's shapes (most of these tests' time)."""
  def both(a, b, c):
    out, vjp = jax.vjp(f, a, b)
    return out, vjp(c)
  return jax.jit(both)(lhs, rhs, cotangent)


def _close(got, want, dtype):
  scale = float(jnp.max(jnp.abs(want.astype(jnp.float32)))) + 1e-6
  err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
  assert err <= TOL[dtype] * scale, (err, scale)


CASES = [  # (m, k, n, groups, group sizes); m, k, n deliberately not multiples of the tiles
    (53, 40, 24, 5, 'random_with_zeros'),
    (64, 32, 48, 4, 'one_group_holds_all'),
    (70, 24, 20, 3, 'short_of_m'),
    (90, 48, 32, 8, 'skewed'),
]


# Mosaic GPU takes 16-bit operands only (wgmma's bf16/fp16 path): it refuses float32 (tested
# below) and is checked in float16 instead.
IMPL_DTYPES = [('triton', jnp.float32), ('triton', jnp.bfloat16), ('xla', jnp.float32),
               ('xla', jnp.bfloat16), ('mosaic_gpu', jnp.bfloat16), ('mosaic_gpu', jnp.float16)]


@pytest.mark.parametrize('case', CASES, ids=[c[-1] for c in CASES])
@pytest.mark.parametrize('implementation,dtype', IMPL_DTYPES,
                         ids=[f'{i}-{jnp.dtype(d).name}' for i, d in IMPL_DTYPES])
def test_forward_and_gradients_match_reference(case, dtype, implementation):
  m, k, n, g, kind = case
  lhs, rhs, sizes, rng = _inputs(dtype, m, k, n, g, kind,
                                 seed=hash((case, jnp.dtype(dtype).name)) % 2**31)
  cotangent = jnp.asarray(rng.standard_normal((m, n)), dtype)
  kw = dict(implementation=implementation, tiling=TILES[implementation], interpret=True)

  out, (d_lhs, d_rhs) = _vjp(lambda a, b: gmm(a, b, sizes, **kw), lhs, rhs, cotangent)
  want, (r_lhs, r_rhs) = _vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs, cotangent)
  assert out.dtype == dtype
  _close(out, want, dtype)
  _close(d_lhs, r_lhs, dtype)
  _close(d_rhs, r_rhs, dtype)
  # Rows of no group are exactly zero in the output and get no gradient.
  total = int(sizes.sum())
  assert not jnp.any(out[total:]) and not jnp.any(d_lhs[total:])
  # Empty groups get an exactly zero weight gradient.
  for i in np.flatnonzero(np.asarray(sizes) == 0):
    assert not jnp.any(d_rhs[i])


@pytest.mark.parametrize('implementation,dtype,order', [
    ('triton', jnp.float32, dict(band=4, group_major=True)),
    ('mosaic_gpu', jnp.bfloat16, dict(band=1))])
def test_launch_orders_give_the_same_products(implementation, dtype, order):
  # The order knobs only reorder the output tiles. Triton: 96 padded rows in 16-row tiles give
  # 6 + 9 pairs, so gmm's last band of 4 is short, and tgmm runs group-major; its defaults
  # launch the plain grids. Mosaic: band 1, against its test tiling's band 2 (its tgmm walk
  # is group-major always).
  lhs, rhs, sizes, rng = _inputs(dtype, 90, 48, 32, 8, 'skewed', seed=21)
  cotangent = jnp.asarray(rng.standard_normal((90, 32)), dtype)
  tiling = dict(TILES[implementation], **order)
  out, grads = _vjp(lambda a, b: gmm(a, b, sizes, implementation=implementation, tiling=tiling,
                                     interpret=True), lhs, rhs, cotangent)
  want, grads_ref = _vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs, cotangent)
  _close(out, want, dtype)
  for got, ref in zip(grads, grads_ref):
    _close(got, ref, dtype)


@pytest.mark.parametrize('case', [(70, 24, 20, [30, 0, 27]),
                                  (300, 128, 192, [28, 198, 15, 27, 32])],
                         ids=['empty_and_short_of_m', 'three_tiles'])
def test_warp_specialized_mosaic_kernels(case):
  """consumers=2: a producer and two consumer warpgroups, in all three products.

  gmm (forward, input gradient): each consumer owns 64 of a tile's 128 rows and skips its
  wgmmas when none of them is in the tile's group (in three_tiles the first group's tile pair
  has rows in the first half only, the third group's in the second half only); the other
  case ends in rows of no group, which the consumers store as zeros, and has an empty group
  (a zero-step pipeline: a zero weight gradient). tgmm (weight gradient): each consumer owns
  64 of a tile's 128 output rows and zeroes the other groups' rows in its own columns of the
  shared lhs block.
  """
  m, k, n, group_sizes = case
  lhs, rhs, _, rng = _inputs(jnp.bfloat16, m, k, n, len(group_sizes), 'skewed', seed=23)
  sizes = jnp.array(group_sizes, jnp.int32)
  cotangent = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
  tiling = dict(TILES['mosaic_gpu'], block_m=128, block_k=128, consumers=2)
  out, (d_lhs, d_rhs) = _vjp(lambda a, b: gmm(a, b, sizes, implementation='mosaic_gpu',
                                                tiling=tiling, interpret=True), lhs, rhs, cotangent)
  want, (r_lhs, r_rhs) = _vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs, cotangent)
  _close(out, want, jnp.bfloat16)
  assert not jnp.any(out[int(sizes.sum()):])
  _close(d_lhs, r_lhs, jnp.bfloat16)
  _close(d_rhs, r_rhs, jnp.bfloat16)
  for i in np.flatnonzero(np.asarray(sizes) == 0):
    assert not jnp.any(d_rhs[i])


def test_tgmm_matches_reference_directly():
  for impl, dtype in (('triton', jnp.float32), ('xla', jnp.float32),
                      ('mosaic_gpu', jnp.bfloat16)):
    lhs, _, sizes, rng = _inputs(dtype, 77, 40, 8, 6, 'random_with_zeros', seed=3)
    grad = jnp.asarray(rng.standard_normal((77, 36)), dtype)
    want = reference.tgmm(lhs, grad, sizes)
    got = tgmm(lhs, grad, sizes, implementation=impl, tiling=TILES[impl], interpret=True)
    _close(got, want, dtype)


@pytest.mark.parametrize('implementation', ['triton', 'mosaic_gpu'])
def test_fp32_output_from_bf16_inputs(implementation):
  lhs, rhs, sizes, _ = _inputs(jnp.bfloat16, 40, 32, 16, 3, 'skewed', seed=5)
  got = gmm(lhs, rhs, sizes, implementation=implementation, preferred_element_type=jnp.float32,
            tiling=TILES[implementation], interpret=True)
  assert got.dtype == jnp.float32
  want = reference.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32)
  _close(got, want, jnp.float32)  # fp32 accumulation: as tight as fp32


@pytest.mark.parametrize('implementation,dtype', [('triton', jnp.float32),
                                                  ('mosaic_gpu', jnp.bfloat16)])
def test_tile_straddling_group_boundaries_with_default_tiles(implementation, dtype):
  # Groups of 1, 127, 129 rows and an empty one against the production tile sizes; for Mosaic
  # GPU the stores of 1, 127 (= 64+32+16+8+4+2+1) and 129 - 128 rows take every bit of the
  # row-count ladder.
  lhs, rhs, _, rng = _inputs(dtype, 300, 64, 128, 4, 'skewed', seed=7)
  sizes = jnp.array([1, 127, 0, 129], jnp.int32)
  got = gmm(lhs, rhs, sizes, implementation=implementation, interpret=True)
  _close(got, reference.gmm(lhs, rhs, sizes), dtype)
  grad = jnp.asarray(rng.standard_normal((300, 128)), dtype)
  got = tgmm(lhs, grad, sizes, implementation=implementation, interpret=True)
  _close(got, reference.tgmm(lhs, grad, sizes), dtype)


def test_triton_defaults_shrink_for_four_byte_operands():
  """Triton's default tiles at float32 asked an H100 for 256 KiB of shared memory (227 KiB
  exist): four-byte operands get half the K depth and two stages, 16-bit ones keep theirs, and
  a tiling the caller names still wins."""
  wide = dict(ops._plan('triton', None, False, 4).get('gmm')[1])
  narrow = dict(ops._plan('triton', None, False, 2).get('tgmm')[1])
  assert (wide['block_k'], wide['num_stages']) == (32, 2)
  assert (narrow['block_k'], narrow['num_stages']) == (64, 3)
  named = dict(ops._plan('triton', dict(block_k=64), False, 4).get('tgmm')[1])
  assert (named['block_k'], named['num_stages']) == (64, 2)


def test_implementation_errors_are_clear():
  lhs, rhs, sizes, _ = _inputs(jnp.float32, 8, 4, 4, 2, 'skewed', seed=1)
  with pytest.raises(ValueError, match="unknown implementation 'cutlass'"):
    gmm(lhs, rhs, sizes, implementation='cutlass')
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
      gmm(lhs, rhs, sizes, implementation='triton')
  with pytest.raises(ValueError, match='group_sizes must be integers'):
    gmm(lhs, rhs, sizes.astype(jnp.float32))
  with pytest.raises(ValueError, match=r'want lhs \[m, k\]'):
    gmm(lhs, rhs[:, :3], sizes)
  with pytest.raises(ValueError, match='bfloat16 or float16 operands'):
    gmm(lhs, rhs, sizes, implementation='mosaic_gpu', interpret=True)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match=r'needs a Hopper GPU \(sm_90'):
      gmm(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), sizes,
          implementation='mosaic_gpu')
  with pytest.raises(ValueError, match="tiling must be None, a dict or 'autotune'"):
    gmm(lhs, rhs, sizes, implementation='triton', tiling='fast', interpret=True)
  with pytest.raises(ValueError, match=r"triton takes no tiling \['consumers'\]; its knobs "
                                       r"are \['band', 'block_k', 'block_m', 'block_n', "
                                       r"'group_major', 'num_stages', 'num_warps'\]"):
    gmm(lhs, rhs, sizes, implementation='triton', tiling=dict(consumers=2), interpret=True)
  with pytest.raises(ValueError, match='cannot tune interpreted'):
    gmm(lhs, rhs, sizes, implementation='triton', tiling='autotune', interpret=True)


def test_triton_lowering_for_cuda_verifies_on_this_machine():
  """The kernels lowered to Triton IR for CUDA, without a GPU: every op must verify.

  An op that fails verification prints in MLIR's generic form ("scf.for" quoted). This caught
  a loop bound lowered as i1, which Triton on an H100 rejected. Uses Pallas' private lowering
  entry point: update the hook if it moves. The target is an abstract H100: jax 0.11 asks the
  device for its compute capability while lowering, and this machine has none.
  """
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from kernels.moe_gmm import triton as tr  # pylint: disable=g-import-not-at-top

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    captured.append(original(*args, **kwargs))
    return captured[-1]

  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  h100 = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=jax.sharding.AbstractDevice(
      device_kind='NVIDIA H100 80GB HBM3', num_cores=132, platform='gpu'))
  lowering.lower_jaxpr_to_triton_module = capture
  count = 0
  try:
    with jax.sharding.use_abstract_mesh(h100):
      for product in ops.PRODUCTS:  # every autotuning candidate of each product
        for tiling in ops.CANDIDATES['triton', product]:
          if product == 'tgmm':
            fn, args = functools.partial(tr.tgmm, **tiling), (spec(256, 128), spec(256, 64), sizes)
          else:
            fn = functools.partial(tr.gmm, transpose_rhs=product == 'gmm_transposed', **tiling)
            args = ((spec(256, 64), spec(4, 128, 64), sizes) if product == 'gmm_transposed'
                    else (spec(256, 128), spec(4, 128, 64), sizes))
          count += 1
          try:
            pl.lower_as_mlir(fn, *args, platforms=['cuda'])
          except ValueError as e:  # export then refuses the custom call; the IR is built by then
            assert 'custom calls' in str(e)
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  assert len(captured) == count
  for result in captured:
    text = str(result.module)
    assert 'scf.for' in text and '"scf.for"' not in text, text[-2000:]


# (rows, k, n, groups): the three shapes of experiments/bench_moe_gmm.py.
REAL_SHAPES = {'mixtral_8x7b': (16384, 4096, 14336, 8), 'deepseek_v2_lite': (16386, 2048, 1408, 64),
               'deepseek_v3': (32768, 7168, 2048, 256)}


def _mosaic_lowerings(rows, k, n, groups, product, tiling):
  from kernels.moe_gmm import mosaic_gpu  # pylint: disable=g-import-not-at-top
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
  sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
  tiling = dict(tiling, num_programs=132)  # the H100's SMs: no GPU here to ask
  if product == 'gmm':
    fn, args = functools.partial(mosaic_gpu.gmm, **tiling), (spec(rows, k), spec(groups, k, n))
  elif product == 'gmm_transposed':
    fn = functools.partial(mosaic_gpu.gmm, transpose_rhs=True, **tiling)
    args = (spec(rows, n), spec(groups, k, n))
  else:
    fn, args = functools.partial(mosaic_gpu.tgmm, **tiling), (spec(rows, k), spec(rows, n))
  return jax.jit(fn).trace(*args, sizes).lower(lowering_platforms=('cuda',)).as_text()


@pytest.mark.parametrize('shape', list(REAL_SHAPES))
def test_mosaic_gpu_lowers_for_cuda_at_real_shapes_with_every_candidate(shape):
  """Lowering a Mosaic GPU kernel for CUDA runs, in Python on this machine, Mosaic's layout
  inference, its dialect lowering and the 227 KiB shared-memory check of sm_90: a candidate
  that would not fit or whose register layouts conflict fails here, not on the GPU. Every
  autotuning candidate at DeepSeek-V2-Lite's shape; the defaults at the others."""
  from jax.experimental.mosaic.gpu import core as mosaic_core  # pylint: disable=g-import-not-at-top
  rows, k, n, groups = REAL_SHAPES[shape]
  for product in ops.PRODUCTS:
    candidates = ops.CANDIDATES['mosaic_gpu', product]
    for tiling in candidates if shape == 'deepseek_v2_lite' else candidates[:1]:
      # Two programs share an SM only if each fits half of its 228 KiB (less 1 KiB reserved
      # per block): check the candidates that count on it against that budget.
      limit = (113 if tiling.get('programs_per_sm', 1) == 2 else 227) * 1024
      with mosaic_core.artificial_shared_memory_limit(limit):
        text = _mosaic_lowerings(rows, k, n, groups, product, tiling)
      assert 'mosaic_gpu' in text, (product, tiling)


# Group sizes for running every autotuning candidate at its own tiles (here for Triton, in
# test_moe_gmm_races.py for Mosaic GPU): 333 rows, so tiles straddle groups, one group is
# empty, and the 6 rows past the last group must come out zero.
CANDIDATE_SIZES = np.array([100, 0, 77, 120, 30], np.int32)


def candidate_check(impl, product, index, dtype, interpret=True):
  """Candidate `index` of CANDIDATES[impl, product] on the autotuner's own correctness problem
  (ops._tuning_problem) with CANDIDATE_SIZES: (its output, the exact result)."""
  # pylint: disable=protected-access
  tiling = ops.CANDIDATES[impl, product][index]
  shapes = ops.product_shapes(product, 333, 256, 256, len(CANDIDATE_SIZES))
  a, b, sizes, want = ops._tuning_problem(product, *shapes, len(CANDIDATE_SIZES), dtype,
                                          sizes=CANDIDATE_SIZES)
  return ops._run(impl, product, tiling, a, b, sizes, None, interpret), want


TRITON_CANDIDATES = [(product, i) for product in ops.PRODUCTS
                     for i in range(len(ops.CANDIDATES['triton', product]))]


@pytest.mark.parametrize('product,index', TRITON_CANDIDATES,
                         ids=[f'{p}-{i}' for p, i in TRITON_CANDIDATES])
def test_every_triton_candidate_is_exact_at_its_own_tiles(product, index):
  # The tests above run the Triton kernels at 16-row tiles; the autotuner's candidates use
  # 64-256 and the banded and group-major walks.
  out, want = candidate_check('triton', product, index, jnp.float32)
  _close(out, want, jnp.float32)
  if product != 'tgmm':
    assert not jnp.any(out[CANDIDATE_SIZES.sum():])


@pytest.mark.parametrize('product', ops.PRODUCTS)
def test_by_slices_references_and_the_autotuning_problem_match_the_specification(product):
  # The exact results the autotuner and the benchmark check kernels against: uneven groups
  # (odd count: the last keeps the mean) and rows of no group, against gmm / tgmm.
  problem = ops._tuning_problem  # pylint: disable=protected-access
  a, b, sizes, want = problem(product, *ops.product_shapes(product, 70, 16, 24, 5), 5,
                              jnp.float32)
  assert list(np.asarray(sizes)) == [17, 11, 17, 11, 14]
  if product == 'tgmm':
    spec = reference.tgmm(a, b, sizes)
  else:
    spec = reference.gmm(a, jnp.swapaxes(b, 1, 2) if product == 'gmm_transposed' else b, sizes)
  _close(want, spec, jnp.float32)


@pytest.mark.parametrize('sizes', [[0, 37, 0, 1, 20], [64, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                         ids=['uneven', 'one_group', 'no_rows'])
def test_by_slices_references_at_empty_groups_and_rows_of_no_group(sizes):
  # One window of rows per group, masked past the group: empty groups, a group larger than
  # half the rows and rows of no group (64 of 70 rows at most are grouped) must all be exact.
  rng = np.random.default_rng(sum(sizes))
  lhs = jnp.asarray(rng.standard_normal((70, 16)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((5, 16, 24)), jnp.float32)
  grad = jnp.asarray(rng.standard_normal((70, 24)), jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  _close(reference.gmm_by_slices(lhs, rhs, np.asarray(sizes)),
         reference.gmm(lhs, rhs, group_sizes), jnp.float32)
  _close(reference.gmm_by_slices(lhs, jnp.swapaxes(rhs, 1, 2), np.asarray(sizes),
                                 transpose_rhs=True),
         reference.gmm(lhs, rhs, group_sizes), jnp.float32)
  _close(reference.tgmm_by_slices(lhs, grad, np.asarray(sizes)),
         reference.tgmm(lhs, grad, group_sizes), jnp.float32)


def test_autotune_tunes_each_product_and_never_picks_a_wrong_kernel(monkeypatch, tmp_path):
  """tiling='autotune' end to end on the CPU: the kernels run interpreted and a fake timer
  stands in for the GPU clock. The fastest candidate is wrong on purpose: it must be refused
  by the correctness check, and the fastest correct one used, for each of the three products
  (forward at the gmm trace, both gradients at the backward's)."""
  from kernels.moe_gmm import autotune  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('EFFICIENTJAX_CACHE_DIR', str(tmp_path))
  autotune.clear_memory_cache()
  base = TILES['triton']
  slow, wrong, fast = (dict(base, block_m=16), dict(base, block_m=32, num_stages=7),
                       dict(base, block_m=32, num_warps=8))
  seconds = [(slow, 3.0), (wrong, 1.0), (fast, 2.0)]  # the wrong one is the fastest
  monkeypatch.setattr(ops, 'CANDIDATES', {('triton', p): [slow, wrong, fast]
                                          for p in ops.PRODUCTS})
  monkeypatch.setattr(ops, '_resolve', lambda implementation, interpret, dtypes: 'triton')
  used = []  # (product, tiling) of every trace of a kernel
  real_run = ops._run  # pylint: disable=protected-access

  def run(impl, product, tiling, a, b, sizes, out_dtype, interpret):
    del interpret
    used.append((product, tiling))
    out = real_run(impl, product, tiling, a, b, sizes, out_dtype, True)
    return out * 1.5 if tiling == wrong else out

  def timer(thunk, repeats):
    del thunk, repeats
    _, tiling = used[-1]  # the candidate just built: its jit traced `run` once
    return next(t for c, t in seconds if c == tiling)

  monkeypatch.setattr(ops, '_run', run)
  monkeypatch.setattr(autotune, 'seconds_per_call', timer)
  lhs, rhs, sizes, rng = _inputs(jnp.float32, 64, 32, 48, 4, 'skewed', seed=11)
  cotangent = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
  out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, implementation='triton', tiling='autotune'),
                     lhs, rhs)
  d_lhs, d_rhs = vjp(cotangent)
  want, vjp_ref = jax.vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs)
  _close(out, want, jnp.float32)
  for got, ref in zip((d_lhs, d_rhs), vjp_ref(cotangent)):
    _close(got, ref, jnp.float32)
  # The computation itself (the last trace of each product) used the fast correct tiling.
  final = {product: tiling for product, tiling in used}
  assert final == {p: fast for p in ops.PRODUCTS}, final
  # Keyed by each product's own operand shapes: lhs [64, 32], rhs [4, 32, 48], grad [64, 48].
  for product in ops.PRODUCTS:
    a, b = ops.product_shapes(product, 64, 32, 48, 4)
    report = ops.autotune_report(product, a, b, 4, jnp.float32, implementation='triton')
    assert report['best'] == dict(fast, implementation='triton') and report['source'] == 'tuned'
    (wrong_error,) = report['errors'].values()
    assert wrong_error.startswith('ValueError: wrong result'), wrong_error



def test_default_implementation_is_mosaic_on_hopper_for_16_bit_operands_only(monkeypatch):
  """implementation=None: the H100-measured order (Mosaic GPU > Triton > ragged_dot)."""
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  monkeypatch.setattr(ops.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(ops, '_hopper', lambda: True)
  assert ops._resolve(None, False, (bf16, bf16)) == 'mosaic_gpu'
  assert ops._resolve(None, False, (jnp.dtype(jnp.float16),) * 2) == 'mosaic_gpu'
  assert ops._resolve(None, False, (f32, f32)) == 'triton'  # wgmma here takes 16-bit operands
  assert ops._resolve(None, False, (bf16, f32)) == 'triton'
  assert ops._resolve(None, True, (bf16, bf16)) == 'xla'
  monkeypatch.setattr(ops, '_hopper', lambda: False)  # e.g. an A100 or a Blackwell part
  assert ops._resolve(None, False, (bf16, bf16)) == 'triton'
