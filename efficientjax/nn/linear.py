"""The one projection layer every matmul in the model goes through.

Keeping every weight behind this module is what lets PEFT adapters (efficientjax/peft) and
quantised weights (efficientjax/quant) change all projections in one place. An adapter is
data: the variables a fine-tuning method placed in the `adapters` collection at this layer's path
(LoRA's `lora_a` and `lora_b`, DoRA's `magnitude`); the layer applies them when they are
there and `adapter` (the method's static settings) is set, and is a plain matmul otherwise.

A quantised kernel is a `QuantizedKernel` stored in `params` in place of the array; the layer
then multiplies through `quant.matmul` (dequantise and dot by default; a registered kernel
where one runs), and adapters see the dequantised kernel.
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.quant import container as quant

Initializer = nn.initializers.Initializer

ADAPTERS = 'adapters'  # the variable collection adapters live in, beside `params`


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
  """What every adapted layer of a run shares (Hugging Face peft's LoraConfig, resolved)."""
  scaling: float        # alpha / r (LoRA, DoRA, PiSSA), alpha / sqrt(r) (RSLoRA)
  dropout: float = 0.0  # on the adapter's input only, while training (a 'dropout' rng given)


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
  adapter: AdapterSettings | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    if len(self.kernel_axes) != len(in_shape) + len(features):
      raise ValueError(f'{self.name}: kernel_axes {self.kernel_axes} do not match '
                       f'{in_shape} -> {features}')
    stored = self.has_variable('params', 'kernel') and self.get_variable('params', 'kernel')
    if quant.is_quantized(stored):
      # Read directly: `self.param` would compare the container's first leaf (int4's packed
      # bytes: half the rows) with the kernel's shape.
      if tuple(stored.shape) != in_shape + features:
        raise ValueError(f'{self.name}: quantised kernel of shape {stored.shape}, expected '
                         f'{in_shape + features}')
      y = quant.matmul(x, stored, self.in_dims, self.dtype)
      kernel = stored
    else:
      kernel = self.param('kernel',
                          nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                          in_shape + features, self.param_dtype)
      y = self._matmul(x, kernel, self.in_dims)
    if self.adapter is not None and self.has_variable(ADAPTERS, 'lora_a'):
      y = self._adapted(x, quant.dequantize(kernel, self.dtype), y)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.kernel_axes[self.in_dims:]), features,
          self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _matmul(self, x: jax.Array, w: jax.Array, in_dims: int) -> jax.Array:
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    return jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), (contract, ((), ())))

  def _adapted(self, x: jax.Array, kernel: jax.Array, y: jax.Array) -> jax.Array:
    """x·W plus the adapter, as Hugging Face peft computes it (bias added by the caller).

    LoRA:  x·W + s · drop(x)·A·B.
    DoRA:  x·W + (m/‖W + s·A·B‖ − 1) · drop(x)·W + m/‖W + s·A·B‖ · s · drop(x)·A·B, the norm
           per output feature over the input dims, taken as a constant in the backward pass
           (DoRA §4.3; peft detaches it). Without dropout this is m/‖·‖ · (x·W + s·x·A·B).
    """
    a = self.get_variable(ADAPTERS, 'lora_a')  # [in..., r]
    b = self.get_variable(ADAPTERS, 'lora_b')  # [r, out...]
    s = self.adapter.scaling
    dropped = x
    if self.adapter.dropout > 0 and self.has_rng('dropout'):
      keep = 1.0 - self.adapter.dropout
      mask = jax.random.bernoulli(self.make_rng('dropout'), keep, x.shape)
      dropped = jnp.where(mask, x / keep, 0).astype(x.dtype)
    lora = self._matmul(self._matmul(dropped, a, self.in_dims), b, 1)
    if not self.has_variable(ADAPTERS, 'magnitude'):
      return y + s * lora
    magnitude = self.get_variable(ADAPTERS, 'magnitude')  # [out...]
    norm = jax.lax.stop_gradient(dora_weight_norm(kernel, a, b, s, self.in_dims))
    ratio = (magnitude.astype(jnp.float32) / norm).astype(self.dtype)
    base = y if dropped is x else self._matmul(dropped, kernel, self.in_dims)
    return y + (ratio - 1) * base + ratio * s * lora


def dora_weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float,
                     in_dims: int) -> jax.Array:
  """‖W + s·A·B‖ per output feature (over the input dims), in float32: DoRA's denominator,
  and its magnitude's initial value."""
  w = kernel.astype(jnp.float32) + scaling * jnp.tensordot(
      a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(in_dims))))
