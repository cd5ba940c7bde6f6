"""KV caches: plain pytrees of arrays, one per layer, written at their tokens' positions.

A cache is created empty (zeros) by the variant's `init_cache` with room for `max_len`
tokens; every forward step over new tokens at positions [p, p + t) writes their entries into
slots [p, p + t) of each row and attends to every slot up to each query's position. Prefill is
one such step from p = 0, decoding a step with t = 1. Because slot = position, a cache needs no
separate length counter: unwritten slots are always in the future of every query.
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Per-K/V-head keys and values (MHA, MQA, GQA): [batch, max_len, kv_heads, head_dim] each."""
  k: jax.Array
  v: jax.Array


def write(buffer: jax.Array, update: jax.Array, positions: jax.Array) -> jax.Array:
  """Writes update [batch, t, ...] into buffer [batch, max_len, ...] at each row's slots
  positions[row, 0] .. + t (a step's positions are contiguous within a row)."""
  def row(buf, upd, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, upd.astype(buf.dtype), start, axis=0)
  return jax.vmap(row)(buffer, update, positions[:, 0])


def slot_positions(buffer: jax.Array) -> jax.Array:
  """[batch, max_len]: the position each slot of a cache buffer holds."""
  batch, max_len = buffer.shape[:2]
  return jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))


def nbytes(cache) -> int:
  """Bytes held by a cache pytree's arrays (measured from the arrays, not from a formula)."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
