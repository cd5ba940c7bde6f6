"""KV caches: plain pytrees of arrays, one per layer, written at their tokens' positions.

A cache is created empty (zeros) by the variant's `init_cache` with room for `max_len`
tokens; every forward step over new tokens at positions [p, p + t) writes their entries into
slots [p, p + t) of each row and attends to every slot up to each query's position. Prefill is
one such step from p = 0, decoding a step with t = 1. Because slot = position, a cache needs no
separate length counter: unwritten slots are always in the future of every query.

A buffer is a plain array in the cache's dtype, or, for an int8 cache, a `QuantizedBuffer`:
int8 codes and a float32 scale per vector (a token's key or value per K/V head; MLA's latent
and RoPE key per token), symmetric absmax / 127, quantised as it is written. Per token (as KIVI,
arXiv 2402.02750, quantises values), because a token's entries are written once, together: its
scale is final when written, where a per-channel scale (KIVI's keys) spans tokens not yet seen.
The scale is float32 so that it adds no error of its own: rounding it to bf16 (relative error
up to 2^-8) would double the worst-case error of a vector's largest entry (half a step,
max|x| / 254). It costs 4 bytes per vector, 3% of the codes at head_dim 128. Variants read
buffers through `read`, which dequantises to the compute dtype.
"""

import flax.struct
import jax
import jax.numpy as jnp

INT8_MAX = 127


@flax.struct.dataclass
class QuantizedBuffer:
  """An int8 cache buffer: values int8 [batch, max_len, ..., dim], scale float32
  [batch, max_len, ..., 1]; entry = values · scale."""
  values: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape


def zeros(shape: tuple[int, ...], dtype) -> jax.Array | QuantizedBuffer:
  """An empty (zero) buffer: a `QuantizedBuffer` for int8, a plain array of any other dtype."""
  if jnp.dtype(dtype) == jnp.int8:
    return QuantizedBuffer(values=jnp.zeros(shape, jnp.int8),
                           scale=jnp.zeros(shape[:-1] + (1,), jnp.float32))
  return jnp.zeros(shape, dtype)


def quantize(x: jax.Array) -> QuantizedBuffer:
  """x [..., dim] -> int8 codes round(x / scale) with scale = max|x| · float32(1/127) over the
  last axis (an all-zero vector gets scale 0 and codes 0)."""
  x = x.astype(jnp.float32)
  # Multiplied by the reciprocal, as XLA would rewrite a division by the constant anyway: one
  # rounding that every backend does alike.
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) * (1 / INT8_MAX)
  codes = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
  return QuantizedBuffer(values=jnp.clip(codes, -INT8_MAX, INT8_MAX).astype(jnp.int8),
                         scale=scale)


def read(buf: jax.Array | QuantizedBuffer, dtype) -> jax.Array:
  """A buffer's entries in `dtype`: a `QuantizedBuffer` dequantised, a plain array cast (a
  no-op when the cache is kept in the compute dtype; a bf16 cache of an fp32 model is read as
  fp32, as the attention wants its operands in one dtype)."""
  if isinstance(buf, QuantizedBuffer):
    return (buf.values.astype(jnp.float32) * buf.scale).astype(dtype)
  return buf.astype(dtype)


@flax.struct.dataclass
class KVCache:
  """Per-K/V-head keys and values (MHA, MQA, GQA): [batch, max_len, kv_heads, head_dim] each."""
  k: jax.Array
  v: jax.Array


def write(buffer: jax.Array | QuantizedBuffer, update: jax.Array, positions: jax.Array
          ) -> jax.Array | QuantizedBuffer:
  """Writes update [batch, t, ...] into buffer [batch, max_len, ...] at each row's slots
  positions[row, 0] .. + t (a step's positions are contiguous within a row), quantised if the
  buffer is."""
  def row(buf, upd, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, upd.astype(buf.dtype), start, axis=0)
  if isinstance(buffer, QuantizedBuffer):
    update = quantize(update)
    return jax.tree.map(lambda b, u: jax.vmap(row)(b, u, positions[:, 0]), buffer, update)
  return jax.vmap(row)(buffer, update, positions[:, 0])


def write_at(buffer: jax.Array | QuantizedBuffer, update: jax.Array, slots: jax.Array
             ) -> jax.Array | QuantizedBuffer:
  """Writes update [batch, n, ...] into buffer [batch, max_len, ...] at slots[row, i] (any
  slots; one out of range is dropped), quantised if the buffer is."""
  def put(buf, upd):
    return jax.vmap(lambda b, i, u: b.at[i].set(u.astype(b.dtype), mode='drop'))(buf, slots, upd)
  if isinstance(buffer, QuantizedBuffer):
    return jax.tree.map(put, buffer, quantize(update))
  return put(buffer, update)


def slot_positions(buffer: jax.Array | QuantizedBuffer) -> jax.Array:
  """[batch, max_len]: the position each slot of a cache buffer holds."""
  batch, max_len = buffer.shape[:2]
  return jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))


def nbytes(cache) -> int:
  """Bytes held by a cache pytree's arrays, a `QuantizedBuffer`'s codes and scales both
  (measured from the arrays, not from a formula)."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
