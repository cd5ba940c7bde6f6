"""The one projection layer every matmul in the model goes through.

Keeping every weight behind this module is what lets PEFT adapters and quantised weights
(later issues) change all projections in one place.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = nn.initializers.Initializer


class Linear(nn.Module):
  """y = x · W, contracting the last `len(in_axes)` dims of x with W's leading dims.

  `kernel_axes` are the logical names of W's dims (inputs then outputs), which the
  sharding rules in `efficientjax.parallel` map onto the mesh.
  """
  features: Sequence[int]
  kernel_axes: Sequence[str]
  in_dims: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    if len(self.kernel_axes) != len(in_shape) + len(features):
      raise ValueError(f'{self.name}: kernel_axes {self.kernel_axes} do not match '
                       f'{in_shape} -> {features}')
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.kernel_axes[self.in_dims:]), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
