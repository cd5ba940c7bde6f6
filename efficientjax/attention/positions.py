"""Positional encodings and their registry (`model.position`).

An encoding can act in three places, each optional:
- `rotate(x, positions)`: on queries and keys inside attention (RoPE and its YaRN scaling);
- `embedding`: a module added to the token embeddings, called as `Embedding(config)(positions)`
  (sinusoidal and learned absolute positions);
- `attention_bias`: a module giving a bias added to the attention logits, called as
  `Bias(config)(q_positions, k_positions)` -> [batch, heads, q_len, k_len] (T5's relative
  buckets).
Every variant calls `rotate` and `attention_bias` and the model calls `embedding`, so a new
encoding is one class here and works with every attention variant that can take it.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.registry import Registry

POSITIONS = Registry('model.position')


@POSITIONS.register('none')
@dataclasses.dataclass(frozen=True)
class NoPosition:
  """No positional information beyond causality (NoPE)."""
  config: Any  # efficientjax.model.ModelConfig (import cycle)
  embedding: ClassVar[type[nn.Module] | None] = None
  attention_bias: ClassVar[type[nn.Module] | None] = None

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    del positions
    return x


@POSITIONS.register('rope')
@dataclasses.dataclass(frozen=True)
class RoPE(NoPosition):
  """Rotary embeddings (Su et al. 2021) in the half-split layout of GPT-NeoX and Hugging Face
  Llama: feature i pairs with feature i + head_dim/2, so HF checkpoints load unpermuted."""

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return apply_rope(x, positions, self.config.rope_theta)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               inv_freq: jax.Array | None = None, attention_factor: float = 1.0) -> jax.Array:
  """x: [batch, length, heads, dim]; positions: [batch, length] integers.

  `inv_freq` ([dim/2]) overrides the plain 1/theta^(2i/dim) frequencies (YaRN); cos and sin are
  multiplied by `attention_factor`, as Hugging Face applies YaRN's temperature.
  """
  half = x.shape[-1] // 2
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
  sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
  cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
