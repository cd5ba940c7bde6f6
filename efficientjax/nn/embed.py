"""Token embeddings, with `attend` for a head tied to the embedding table."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits against the table (a tied output head)."""
    return jnp.einsum('...e,ve->...v', x.astype(self.dtype), self.embedding.astype(self.dtype))
