"""Feed-forward blocks and their registry (`model.ffn`): `dense` here, `moe` in efficientjax.moe."""

import flax.linen as nn
import jax

from efficientjax.nn.linear import Linear
from efficientjax.registry import Registry

FFN = Registry('model.ffn')


@FFN.register('dense')
class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), as in Llama."""
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @staticmethod
  def flops_per_token(cfg) -> float:
    """Forward FLOPs per token: gate, up and down."""
    return 2.0 * 3 * cfg.embed_dim * cfg.mlp_dim

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                kernel_init=nn.initializers.normal(cfg.init_std))
    gate = Linear((cfg.mlp_dim,), ('embed', 'mlp'), name='gate', **proj)(x)
    up = Linear((cfg.mlp_dim,), ('embed', 'mlp'), name='up', **proj)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return Linear((cfg.embed_dim,), ('mlp', 'embed'), name='down', **proj)(h)
