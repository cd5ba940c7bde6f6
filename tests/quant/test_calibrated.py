"""GPTQ against a plain transcription of the paper's algorithm, and AWQ and GPTQ against RTN.

- `gptq_paper` below is Algorithm 1 of Frantar et al. 2022 written out loop by loop in numpy
  float64, in the paper's layout (W [rows = outputs, columns = inputs]), without lazy batching:
  every column's error reaches every later column at once, and a group's scale is taken from its
  columns as they stand when it starts. The library's blocked float32 version must give the same
  codes (allowing a rare flip at a rounding tie: ≤ 0.5% of codes) and scales, on small matrices
  of several blocks, a padded last block, a dead input, per-channel and grouped, symmetric and
  with zero points, and act_order.
- On correlated activations with outlier channels (a few input features 20-50x the rest, as
  real LLMs have), GPTQ and AWQ both give a lower layer-output error ‖XW - XŴ‖² on the
  calibration set than RTN at the same bits and group size (int4 and int3 codes).
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from efficientjax import quant
from efficientjax.quant import awq, formats, gptq


def _bf16(a):
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _params(cols, bits, symmetric):
  """Scale and zero of each row over `cols` [rows, n] (the closed forms of formats.py)."""
  if symmetric:
    return _bf16(np.abs(cols).max(1) / (2 ** (bits - 1) - 1)), None
  lo, hi = cols.min(1), cols.max(1)
  scale = _bf16(np.maximum(hi - lo, 1e-5) / (2 ** bits - 1))
  return scale, np.clip(np.rint(-lo / scale), 0, 2 ** bits - 1)


def _quant(w, scale, zero, bits):
  safe = np.where(scale > 0, scale, 1.0)
  if zero is None:
    m = 2 ** (bits - 1) - 1
    q = np.where(scale > 0, np.clip(np.rint(w / safe), -m, m), 0.0)
    return q, q * scale
  q = np.clip(np.rint(w / safe) + zero, 0, 2 ** bits - 1)
  return q, (q - zero) * scale


def gptq_paper(w, h, *, bits, group_size, symmetric, act_order=False, damp=0.01):
  """W [out, in] float64, H [in, in] -> (codes [out, in], scales [out, groups])."""
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  n = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  static = act_order or group_size >= n
  groups = [_params(w[:, g:g + group_size], bits, symmetric) for g in range(0, n, group_size)]
  order = np.argsort(-np.diag(h), kind='stable') if act_order else np.arange(n)
  w, h = w[:, order], h[order][:, order]
  h += damp * np.mean(np.diag(h)) * np.eye(n)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = Uᵀ U
  q_all = np.zeros_like(w)
  for j in range(n):
    if static:
      scale, zero = groups[order[j] // group_size]
    elif j % group_size == 0:
      scale, zero = groups[j // group_size] = _params(w[:, j:j + group_size], bits, symmetric)
    q, deq = _quant(w[:, j], scale, zero, bits)
    err = (w[:, j] - deq) / u[j, j]
    w[:, j:] -= np.outer(err, u[j, j:])
    q_all[:, j] = q
  return q_all[:, np.argsort(order)], np.stack([g[0] for g in groups], axis=1)


def _activations(n, d, seed, outliers=(3, 11), gain=(20.0, 50.0)):
  """Correlated features (mixed through a random matrix, as a layer's inputs are) with a few
  outlier channels."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d))
  x = (x + 0.3 * rng.standard_normal((n, d))) * rng.uniform(0.5, 1.5, d)
  for c, g in zip(outliers, gain):
    x[:, c] *= g
  return x.astype(np.float32)


@pytest.mark.parametrize('n_in,bits,group,symmetric,act_order', [
    (48, 4, 8, True, False),    # 3 blocks of 16, 2 groups per block
    (40, 4, 8, False, False),   # the last block padded, zero points
    (32, 8, 32, True, False),   # int8 per channel
    (48, 3, 16, True, True),    # act_order: static groups, permuted columns
])
def test_gptq_equals_the_paper(n_in, bits, group, symmetric, act_order):
  rng = np.random.default_rng(n_in + bits)
  x = _activations(256, n_in, seed=bits)
  x[:, 5] = 0  # a dead input
  w = rng.standard_normal((n_in, 12)).astype(np.float32)
  h = 2 * x.T.astype(np.float64) @ x / len(x)
  q, scales, zeros = gptq.gptq(jnp.asarray(w), jnp.asarray(h, jnp.float32), bits=bits,
                               group_size=group, symmetric=symmetric, block_size=16,
                               act_order=act_order)
  q_ref, scales_ref = gptq_paper(w.T, h, bits=bits, group_size=group, symmetric=symmetric,
                                 act_order=act_order)
  q, q_ref = np.asarray(q), q_ref.T
  assert (zeros is None) == symmetric
  assert np.mean(q != q_ref) <= 0.005, f'{np.sum(q != q_ref)} of {q.size} codes differ'
  np.testing.assert_allclose(np.asarray(scales), scales_ref.T, rtol=1e-2)
  # The dead input's weights were zeroed: its codes dequantise to 0.
  np.testing.assert_array_equal(q[5], 0 if symmetric else np.asarray(zeros)[5 // group])


def _errors(x, w, bits, group, symmetric):
  """Layer-output error on x of RTN, GPTQ and AWQ at the same format."""
  kind = 'int8' if bits == 8 else 'int4'
  rtn = quant.quantize_kernel(jnp.asarray(w), kind, bits=bits, group_size=group,
                              symmetric=symmetric, dtype='float32')
  h = 2 * x.T @ x / len(x)
  q, s, z = gptq.gptq(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group,
                      symmetric=symmetric)
  gq = formats.container(kind, q, s, z, bits=bits, group_size=group, shape=w.shape, in_dims=1,
                         scale_dtype='bfloat16', dtype='float32')
  act, alpha, _ = awq.search(jnp.asarray(w), jnp.asarray(np.abs(x).mean(0)), jnp.asarray(x[:512]),
                             kind=kind, bits=bits, group_size=group, symmetric=symmetric)
  aq = quant.quantize_kernel(jnp.asarray(w), kind, bits=bits, group_size=group,
                             symmetric=symmetric, act_scale=act, dtype='float32')
  err = lambda k: float(quant.layer_error(jnp.asarray(x), jnp.asarray(w), k))
  return err(rtn), err(gq), err(aq), float(alpha)


@pytest.mark.parametrize('bits,symmetric', [(4, True), (3, False)])
def test_gptq_and_awq_beat_rtn_on_the_calibration_set(bits, symmetric):
  x = _activations(1024, 64, seed=7)
  w = (np.random.default_rng(8).standard_normal((64, 32)) * 0.05).astype(np.float32)
  rtn, gptq_err, awq_err, alpha = _errors(x, w, bits, group=32, symmetric=symmetric)
  # Measured: GPTQ about 0.5 of RTN's error, AWQ 0.15-0.2.
  assert gptq_err < 0.7 * rtn, (gptq_err, rtn)
  assert awq_err < 0.5 * rtn, (awq_err, rtn)
  assert alpha > 0  # the search moved off plain RTN (α = 0)
