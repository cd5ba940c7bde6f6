"""Normalisation layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x / rms(x) * scale, with the statistics in float32 whatever the compute dtype."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast before scaling, as Llama does, so bf16 runs round the same way as the reference.
    return scale.astype(self.dtype) * x32.astype(self.dtype)
