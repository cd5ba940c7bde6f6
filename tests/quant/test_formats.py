"""The stored formats against closed forms computed here in numpy, and Linear's matmul with them.

- int4 packing: every byte unpacks and packs back to itself, every pair of codes packs and
  unpacks to itself, row 2i lands in the low nibble and 2i+1 in the high one (checked on
  hand-made bytes), and an odd input width is refused.
- dequantize equals the closed form, written here without the library's code: int8 per channel
  (scale = max|w|/127), int4 symmetric per group (max|w|/7, nibble = q + 8), int4 with zero
  points ((max - min)/15, zero = round(-min/scale)), fp8 e4m3 per channel (max|w|/448), each
  scale rounded to bf16 before the codes are taken; the stored codes and bytes are checked too,
  and AWQ's act_scale divides the rows.
- Linear holding a container computes x · dequantize(W) (one and two contracted dims, float32
  and bf16 compute), inside nn.scan with a layer axis on every leaf too, with a LoRA adapter it
  adds the adapter to the quantised product, and the matmul registry dispatches to a
  registered implementation and refuses unknown or unavailable ones by name.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from efficientjax import quant
from efficientjax.nn.linear import ADAPTERS, AdapterSettings, Linear
from efficientjax.quant import container as qc

BF16 = ml_dtypes.bfloat16


def _bf16(a):
  """float32 -> rounded to bf16 -> float32, as the library stores scales."""
  return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def _weights(shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  w[..., 1] = 0.0  # an all-zero output channel: scale 0, codes 0
  return w


# ---------------------------------------------------------------------------------------------
# Packing.


def test_every_byte_round_trips():
  packed = np.arange(256, dtype=np.uint8).reshape(1, 256)
  codes = np.asarray(qc.unpack_int4(jnp.asarray(packed)))
  assert codes.shape == (2, 256) and codes.max() == 15
  np.testing.assert_array_equal(np.asarray(qc.pack_int4(jnp.asarray(codes))), packed)


def test_every_code_pair_round_trips_and_nibble_order():
  lo, hi = np.meshgrid(np.arange(16), np.arange(16), indexing='ij')
  codes = np.stack([lo.ravel(), hi.ravel()]).astype(np.uint8)  # [2 rows, 256 columns]
  packed = np.asarray(qc.pack_int4(jnp.asarray(codes)))
  np.testing.assert_array_equal(packed[0], (lo.ravel() | (hi.ravel() << 4)).astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(qc.unpack_int4(jnp.asarray(packed))), codes)
  # Rows 0..3 of one column: bytes (row0 | row1 << 4), (row2 | row3 << 4).
  col = jnp.asarray([[1], [2], [0xA], [0xF]], jnp.uint8)
  np.testing.assert_array_equal(np.asarray(qc.pack_int4(col))[:, 0], [0x21, 0xFA])


def test_odd_input_width_is_refused():
  with pytest.raises(ValueError, match='even'):
    qc.pack_int4(jnp.zeros((3, 4), jnp.uint8))
  with pytest.raises(ValueError, match='divide'):
    quant.quantize_kernel(jnp.ones((12, 4)), 'int4', group_size=8)


# ---------------------------------------------------------------------------------------------
# Closed forms.


def test_int8_closed_form():
  w = _weights((24, 6))
  k = quant.quantize_kernel(jnp.asarray(w), 'int8', scale_dtype='bfloat16', dtype='float32')
  scale = _bf16(np.abs(w).max(0) / 127)
  q = np.clip(np.rint(np.divide(w, scale, out=np.zeros_like(w), where=scale > 0)), -127, 127)
  assert k.values.dtype == jnp.int8 and k.scales.shape == (1, 6)
  np.testing.assert_array_equal(np.asarray(k.values), q)
  np.testing.assert_array_equal(np.asarray(k.scales, np.float32)[0], scale)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(k)), q * scale)
  assert np.abs(q * scale - w).max() <= scale.max() / 2 * 1.01


@pytest.mark.parametrize('symmetric', [True, False])
def test_int4_closed_form(symmetric):
  group, shape = 8, (4, 8, 6)  # in_dims=2: a [4·8 = 32, 6] matrix, 4 groups per column
  w = _weights(shape, seed=1)
  k = quant.quantize_kernel(jnp.asarray(w), 'int4', in_dims=2, group_size=group,
                            symmetric=symmetric, dtype='float32')
  g = w.reshape(4, group, 6)  # [groups, rows, out]
  if symmetric:
    scale = _bf16(np.abs(g).max(1, keepdims=True) / 7)
    q = np.clip(np.rint(np.divide(g, scale, out=np.zeros_like(g), where=scale > 0)), -7, 7)
    expected, nibbles = q * scale, q + 8
    assert k.zeros is None
  else:
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    scale = _bf16(np.maximum(hi - lo, 1e-5) / 15)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(g / scale) + zero, 0, 15)
    expected, nibbles = (q - zero) * scale, q
    np.testing.assert_array_equal(np.asarray(k.zeros), zero[:, 0].astype(np.uint8))
    assert k.zeros.dtype == jnp.uint8
  assert k.values.dtype == jnp.uint8 and k.values.shape == (16, 6)
  nibbles = nibbles.reshape(32, 6).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(k.values), nibbles[0::2] | (nibbles[1::2] << 4))
  np.testing.assert_array_equal(np.asarray(k.scales, np.float32), scale[:, 0])
  np.testing.assert_array_equal(np.asarray(quant.dequantize(k)), expected.reshape(shape))


def test_fp8_closed_form():
  w = _weights((16, 5), seed=2)
  w[3, 0] = 40.0  # one large weight: its column's scale, and 448 exactly after division
  k = quant.quantize_kernel(jnp.asarray(w), 'fp8', dtype='float32')
  scale = _bf16(np.abs(w).max(0) / 448)
  v = np.clip(np.divide(w, scale, out=np.zeros_like(w), where=scale > 0), -448, 448)
  v = v.astype(ml_dtypes.float8_e4m3fn)
  assert k.values.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(k.values).view(np.uint8), v.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(quant.dequantize(k)), v.astype(np.float32) * scale)
  assert np.isfinite(np.asarray(quant.dequantize(k))).all()


def test_act_scale_divides_rows():
  w = _weights((16, 4), seed=3)
  s = np.linspace(0.5, 4.0, 16).astype(np.float32)
  k = quant.quantize_kernel(jnp.asarray(w), 'int4', group_size=8, act_scale=jnp.asarray(s),
                            dtype='float32')
  plain = quant.quantize_kernel(jnp.asarray(w * s[:, None]), 'int4', group_size=8,
                                dtype='float32')
  np.testing.assert_array_equal(np.asarray(k.values), np.asarray(plain.values))
  np.testing.assert_allclose(np.asarray(quant.dequantize(k)),
                             np.asarray(quant.dequantize(plain)) / s[:, None], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Linear.


def _dense(k):
  return np.asarray(quant.dequantize(k, jnp.float32), np.float64)


@pytest.mark.parametrize('kind,in_dims,dtype', [('int4', 1, jnp.float32), ('int8', 2, jnp.float32),
                                                ('fp8', 1, jnp.bfloat16)])
def test_linear_multiplies_by_the_dequantized_kernel(kind, in_dims, dtype):
  shape = (16, 6) if in_dims == 1 else (4, 4, 6)
  k = quant.quantize_kernel(jnp.asarray(_weights(shape, seed=4)), kind, in_dims=in_dims,
                            group_size=8 if kind == 'int4' else None, dtype='float32')
  x = np.random.default_rng(5).standard_normal((2, 3) + shape[:in_dims]).astype(np.float32)
  axes = ('embed', 'mlp') if in_dims == 1 else ('heads', 'head_dim', 'embed')
  layer = Linear((6,), axes, in_dims=in_dims, dtype=dtype)
  y = layer.apply({'params': {'kernel': k}}, jnp.asarray(x))
  assert y.dtype == dtype
  w = _dense(k)
  if dtype == jnp.bfloat16:  # the inputs and the dequantised kernel rounded, then contracted
    x, w = _bf16(x).astype(np.float64), _bf16(w).astype(np.float64)
  expected = np.tensordot(x, w, axes=in_dims)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tol, atol=tol)


def test_linear_under_scan_sees_one_layer():
  layers = [quant.quantize_kernel(jnp.asarray(_weights((16, 6), seed=10 + i)), 'int4',
                                  group_size=8, symmetric=False, dtype='float32') for i in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  assert stacked.values.shape == (3, 8, 6) and stacked.shape == (16, 6)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(_Apply, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=nn.broadcast, length=3)
      return scan(name='layers')(jnp.zeros(()), x)[1]

  x = np.random.default_rng(6).standard_normal((2, 16)).astype(np.float32)
  ys = Stack().apply({'params': {'layers': {'proj': {'kernel': stacked}}}}, jnp.asarray(x))
  for i, k in enumerate(layers):
    np.testing.assert_allclose(np.asarray(ys[i]), x @ _dense(k), rtol=1e-5, atol=1e-5)


class _Apply(nn.Module):
  """One layer of the scan above: the carry passes through, the output is x · W_layer."""
  @nn.compact
  def __call__(self, carry, x):
    return carry, Linear((6,), ('embed', 'mlp'), name='proj')(x)


def test_lora_adds_to_the_quantized_product():
  k = quant.quantize_kernel(jnp.asarray(_weights((16, 6), seed=7)), 'int8', dtype='float32')
  rng = np.random.default_rng(8)
  a, b = rng.standard_normal((16, 2)), rng.standard_normal((2, 6))
  x = rng.standard_normal((3, 16)).astype(np.float32)
  layer = Linear((6,), ('embed', 'mlp'), adapter=AdapterSettings(scaling=0.5))
  y = layer.apply({'params': {'kernel': k},
                   ADAPTERS: {'lora_a': jnp.asarray(a, jnp.float32),
                              'lora_b': jnp.asarray(b, jnp.float32)}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), x @ _dense(k) + 0.5 * x @ a @ b, rtol=1e-5, atol=1e-5)


def test_matmul_registry_dispatches_and_refuses():
  k = quant.quantize_kernel(jnp.asarray(_weights((16, 6), seed=9)), 'int4', group_size=8)
  x = jnp.ones((1, 16))
  calls = []

  def fake(x, kernel, in_dims, dtype):
    calls.append(kernel.kind)
    return jnp.full(x.shape[:-1] + (6,), 7.0, dtype)

  quant.register_matmul('int4', 'test_fake', fake)
  quant.register_matmul('int4', 'test_unavailable', fake, available=lambda: False)
  try:
    params = quant.with_implementation({'proj': {'kernel': k}}, 'test_fake')
    y = Linear((6,), ('embed', 'mlp'), name='proj').apply({'params': params['proj']}, x)
    assert calls == ['int4'] and float(y[0, 0]) == 7.0
    with pytest.raises(ValueError, match="unknown quantised matmul 'nope'.*registered: test_fake"):
      quant.matmul(x, k, 1, jnp.float32, implementation='nope')
    with pytest.raises(ValueError, match='cannot run on this backend'):
      quant.matmul(x, k, 1, jnp.float32, implementation='test_unavailable')
    with pytest.raises(ValueError, match='in_dims=1, called with in_dims=2'):
      quant.matmul(jnp.ones((1, 4, 4)), k, 2, jnp.float32)
  finally:
    del quant.MATMULS['int4']['test_fake'], quant.MATMULS['int4']['test_unavailable']
