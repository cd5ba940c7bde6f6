"""Positional encodings and their registry (`model.position`).

An encoding may act on the token embeddings (`embed`, e.g. absolute) and/or on the queries
and keys inside attention (`rotate`, e.g. RoPE); the identity is the default for both.
"""

import dataclasses

import jax
import jax.numpy as jnp

from efficientjax.registry import Registry

POSITIONS = Registry('model.position')


@POSITIONS.register('none')
@dataclasses.dataclass(frozen=True)
class NoPosition:
  """No positional information beyond causality (NoPE)."""
  theta: float = 10000.0

  def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    del positions
    return x

  def rotate(self, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    del positions
    return q, k


@POSITIONS.register('rope')
@dataclasses.dataclass(frozen=True)
class RoPE(NoPosition):
  """Rotary embeddings (Su et al. 2021) in the half-split layout of GPT-NeoX and Hugging Face
  Llama: feature i pairs with feature i + head_dim/2, so HF checkpoints load unpermuted."""

  def rotate(self, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return apply_rope(q, positions, self.theta), apply_rope(k, positions, self.theta)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x: [batch, length, heads, head_dim]; positions: [batch, length] integers."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
