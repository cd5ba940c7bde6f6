"""The int8 KV cache (`init_cache(..., 'int8')`): its quantisation against a numpy closed form,
its size against the exact byte count, and decoding with it against the full forward pass for
every attention variant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import cache as kv_cache
from efficientjax.attention.nsa import num_blocks
from efficientjax.model import init_cache
from tests.attention.variants import TINY
from tests.helpers import decode_step, jitted_forward, jitted_init

# Logits of the tiny models (std ~0.11) from an int8 cache stay within INT8_ATOL of the forward
# pass (measured at most 1.2e-3, mqa); a float32 cache within FLOAT_ATOL (measured <= 1e-7),
# the tolerance test_variants.py holds it to.
INT8_ATOL = 3e-3
FLOAT_ATOL = 2e-5


def _quantized(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The closed form in numpy float32: per vector (last axis) scale = max|x| · (1/127), codes =
  round-half-even(x / scale) (0 for a zero vector)."""
  x = np.asarray(x, np.float32)
  scale = np.max(np.abs(x), axis=-1, keepdims=True) * np.float32(1 / 127)
  codes = np.round(x / np.where(scale > 0, scale, np.float32(1)))
  return np.clip(codes, -127, 127).astype(np.int8), scale


def _vectors(key, shape):
  """Normal vectors of magnitudes spread over six decades (so one scale per tensor, or per
  token across heads, would fail), one of them all zeros."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, shape) * 10.0 ** jax.random.uniform(k2, shape[:-1] + (1,),
                                                                 minval=-3, maxval=3)
  return np.asarray(x).copy()


def test_write_then_read_is_the_closed_form():
  batch, max_len, heads, dim = 2, 9, 3, 8
  buf = kv_cache.zeros((batch, max_len, heads, dim), 'int8')
  assert isinstance(buf, kv_cache.QuantizedBuffer)
  prefill = _vectors(jax.random.key(0), (batch, 5, heads, dim))
  prefill[1, 2, 0] = 0.0
  step = _vectors(jax.random.key(1), (batch, 1, heads, dim))
  # Rows at different positions: a prefill at 2 (row 0) and 0 (row 1), then one token each.
  buf = kv_cache.write(buf, jnp.asarray(prefill), jnp.array([[2], [0]]) + jnp.arange(5))
  buf = kv_cache.write(buf, jnp.asarray(step), jnp.array([[7], [5]]))

  want = np.zeros((batch, max_len, heads, dim), np.float32)
  want[0, 2:7], want[1, 0:5] = prefill[0], prefill[1]
  want[0, 7], want[1, 5] = step[0, 0], step[1, 0]
  codes, scale = _quantized(want)
  np.testing.assert_array_equal(buf.values, codes)
  np.testing.assert_array_equal(buf.scale, scale)
  assert buf.values.dtype == jnp.int8 and buf.scale.dtype == jnp.float32
  got = kv_cache.read(buf, jnp.float32)
  np.testing.assert_array_equal(got, codes.astype(np.float32) * scale)
  # Independently of the closed form: each vector within half a step, its largest entry exact
  # up to the division's rounding, the zero vector zero.
  assert np.all(np.abs(got - want) <= scale / 2 * (1 + 1e-6))
  np.testing.assert_allclose(np.max(np.abs(got), -1), np.max(np.abs(want), -1), rtol=1e-6)
  assert np.all(got[1, 2, 0] == 0)
  assert kv_cache.read(buf, jnp.bfloat16).dtype == jnp.bfloat16

  # write_at (NSA's compressed blocks): any slots per row, one out of range dropped.
  blocks = kv_cache.zeros((batch, 4, heads, dim), 'int8')
  new = _vectors(jax.random.key(2), (batch, 2, heads, dim))
  blocks = kv_cache.write_at(blocks, jnp.asarray(new), jnp.array([[3, 4], [1, 0]]))
  want = np.zeros((batch, 4, heads, dim), np.float32)
  want[0, 3], want[1, 1], want[1, 0] = new[0, 0], new[1, 0], new[1, 1]
  codes, scale = _quantized(want)
  np.testing.assert_array_equal(blocks.values, codes)
  np.testing.assert_array_equal(blocks.scale, scale)

  # Plain buffers are read in the asked dtype: the array itself when it is already that.
  plain = jnp.ones((2, 3), jnp.bfloat16)
  assert kv_cache.read(plain, jnp.bfloat16) is plain
  assert kv_cache.read(plain, jnp.float32).dtype == jnp.float32


def _cache_counts(cfg, max_len: int) -> tuple[int, int]:
  """(values, vectors) one layer's cache of one row holds: each vector gets one scale."""
  if cfg.attention == 'mla':
    return max_len * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim), 2 * max_len
  if cfg.attention == 'nsa':  # three branches' raw k and v, and the compressed k and v
    rows = 6 * max_len + 2 * num_blocks(max_len, cfg.nsa.block_len, cfg.nsa.stride)
  else:
    rows = 2 * max_len
  return rows * cfg.num_kv_heads * cfg.head_dim, rows * cfg.num_kv_heads


@pytest.mark.parametrize('name', sorted(TINY))
def test_int8_cache_bytes_are_the_exact_count(name):
  cfg, batch, max_len = TINY[name], 3, 16
  values, vectors = _cache_counts(cfg, max_len)
  per_row = cfg.num_layers * batch
  bf16 = init_cache(cfg, batch, max_len, jnp.bfloat16)
  int8 = init_cache(cfg, batch, max_len, 'int8')
  assert kv_cache.nbytes(bf16) == 2 * values * per_row
  # The codes are half the bf16 bytes; each vector adds a float32 scale.
  assert kv_cache.nbytes(int8) == kv_cache.nbytes(bf16) // 2 + 4 * vectors * per_row
  # Every other dtype keeps plain arrays of that dtype.
  for dtype in (jnp.float32, jnp.bfloat16):
    leaves = jax.tree.leaves(init_cache(cfg, batch, max_len, dtype),
                             is_leaf=lambda a: isinstance(a, kv_cache.QuantizedBuffer))
    assert all(isinstance(a, jax.Array) and a.dtype == dtype for a in leaves)


def _prefill_then_decode(cfg, params, tokens, prefill, max_len, dtype):
  """tests/helpers.py's prefill_then_decode, with the cache's dtype: logits and the cache."""
  batch, length = tokens.shape
  step = decode_step(cfg)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
  cache = init_cache(cfg, batch, max_len, dtype)
  logits, cache = step(params, tokens[:, :prefill], positions[:, :prefill], cache)
  out = [logits]
  for i in range(prefill, length):
    logits, cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize('name', sorted(TINY))
def test_int8_cache_decodes_like_the_forward_pass(name):
  cfg, length = TINY[name], 24
  tokens = jax.random.randint(jax.random.key(3), (2, length), 0, cfg.vocab_size)
  params = nn.unbox(jitted_init(cfg)(jax.random.key(2), tokens)['params'])
  want = jitted_forward(cfg)({'params': params}, tokens)
  # A prompt ending mid-block (NSA's blocks are 2-4 tokens) in a cache longer than the sequence.
  got, cache = _prefill_then_decode(cfg, params, tokens, 7, length + 5, 'int8')
  assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}
  int8_error = float(np.abs(got - want).max())
  float_got, _ = _prefill_then_decode(cfg, params, tokens, 7, length + 5, jnp.float32)
  float_error = float(np.abs(float_got - want).max())
  assert int8_error <= INT8_ATOL, f'{name}: int8 cache error {int8_error:.2e}'
  assert float_error <= FLOAT_ATOL, f'{name}: float32 cache error {float_error:.2e}'
  # The int8 cache really is quantised: its error is far above float32's.
  assert int8_error > 10 * float_error
