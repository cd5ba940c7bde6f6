"""kernels/moe_gmm against its reference: forward and both gradients, on fresh random inputs.

On CPU the Triton kernels run through Pallas' interpreter at small tiles; the GPU runs them
compiled at real shapes in experiments/bench_moe_gmm.py (which checks before it times).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe_gmm import gmm, reference, tgmm

TILES = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


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


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('case', CASES, ids=[c[-1] for c in CASES])
@pytest.mark.parametrize('implementation', ['triton', 'xla'])
def test_forward_and_gradients_match_reference(case, dtype, implementation):
  m, k, n, g, kind = case
  lhs, rhs, sizes, rng = _inputs(dtype, m, k, n, g, kind, seed=hash((case, str(dtype))) % 2**31)
  cotangent = jnp.asarray(rng.standard_normal((m, n)), dtype)
  kw = dict(implementation=implementation, tiling=TILES, interpret=True)

  out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, **kw), lhs, rhs)
  want, vjp_ref = jax.vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs)
  assert out.dtype == dtype
  _close(out, want, dtype)
  d_lhs, d_rhs = vjp(cotangent)
  r_lhs, r_rhs = vjp_ref(cotangent)
  _close(d_lhs, r_lhs, dtype)
  _close(d_rhs, r_rhs, dtype)
  # Rows of no group are exactly zero in the output and get no gradient.
  total = int(sizes.sum())
  assert not jnp.any(out[total:]) and not jnp.any(d_lhs[total:])
  # Empty groups get an exactly zero weight gradient.
  for i in np.flatnonzero(np.asarray(sizes) == 0):
    assert not jnp.any(d_rhs[i])


def test_tgmm_matches_reference_directly():
  lhs, _, sizes, rng = _inputs(jnp.float32, 77, 40, 8, 6, 'random_with_zeros', seed=3)
  grad = jnp.asarray(rng.standard_normal((77, 36)), jnp.float32)
  want = reference.tgmm(lhs, grad, sizes)
  for impl in ('triton', 'xla'):
    got = tgmm(lhs, grad, sizes, implementation=impl, tiling=TILES, interpret=True)
    _close(got, want, jnp.float32)


def test_fp32_output_from_bf16_inputs():
  lhs, rhs, sizes, _ = _inputs(jnp.bfloat16, 40, 32, 16, 3, 'skewed', seed=5)
  got = gmm(lhs, rhs, sizes, implementation='triton', preferred_element_type=jnp.float32,
            tiling=TILES, interpret=True)
  assert got.dtype == jnp.float32
  want = reference.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32)
  _close(got, want, jnp.float32)  # fp32 accumulation: as tight as fp32


def test_tile_straddling_group_boundaries_with_default_tiles():
  # Groups of 1, 127, 129 rows and an empty one against the production tile size.
  lhs, rhs, _, _ = _inputs(jnp.float32, 300, 64, 128, 4, 'skewed', seed=7)
  sizes = jnp.array([1, 127, 0, 129], jnp.int32)
  got = gmm(lhs, rhs, sizes, implementation='triton', interpret=True)
  _close(got, reference.gmm(lhs, rhs, sizes), jnp.float32)


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


def test_triton_lowering_for_cuda_verifies_on_this_machine():
  """The kernels lowered to Triton IR for CUDA, without a GPU: every op must verify.

  An op that fails verification prints in MLIR's generic form ("scf.for" quoted). This caught
  a loop bound lowered as i1, which Triton on an H100 rejected. Uses Pallas' private lowering
  entry point: update the hook if it moves.
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
  lowering.lower_jaxpr_to_triton_module = capture
  try:
    for fn, args in [(lambda a, b, g: tr.gmm(a, b, g), (spec(256, 128), spec(4, 128, 64), sizes)),
                     (lambda a, b, g: tr.gmm(a, b, g, transpose_rhs=True),
                      (spec(256, 64), spec(4, 128, 64), sizes)),
                     (lambda a, d, g: tr.tgmm(a, d, g), (spec(256, 128), spec(256, 64), sizes))]:
      try:
        pl.lower_as_mlir(fn, *args, platforms=['cuda'])
      except ValueError as e:  # export then refuses the custom call; the IR is built by then
        assert 'custom calls' in str(e)
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  assert len(captured) == 3
  for result in captured:
    text = str(result.module)
    assert 'scf.for' in text and '"scf.for"' not in text, text[-2000:]
