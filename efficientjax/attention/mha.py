"""Multi-head attention with any number of K/V heads (MHA when kv_heads == heads)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.attention.core import dot_product_attention
from efficientjax.attention.positions import POSITIONS
from efficientjax.nn.linear import Linear


class MultiHeadAttention(nn.Module):
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=nn.initializers.normal(cfg.init_std))
    q = Linear((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), name='q', **proj)(x)
    k = Linear((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), name='k', **proj)(x)
    v = Linear((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), name='v', **proj)(x)
    q, k = POSITIONS.get(cfg.position)(theta=cfg.rope_theta).rotate(q, k, positions)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))
    out = dot_product_attention(q, k, v, implementation=cfg.attention_impl, is_causal=True)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    return Linear((cfg.embed_dim,), ('heads', 'head_dim', 'embed'), in_dims=2, name='o', **proj)(out)
