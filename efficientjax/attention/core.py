"""The scaled-dot-product core every attention variant calls.

`jax.nn.dot_product_attention` takes grouped K/V heads natively (no repeated K/V in memory)
and reaches cuDNN's flash attention on NVIDIA GPUs.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def resolve_implementation(implementation: str, dtype, backend: str | None = None) -> str:
  """What `auto` means on this backend: cuDNN where it can run (GPU, 16-bit), XLA elsewhere."""
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = 'auto',
                          is_causal: bool = True, scale: float | None = None) -> jax.Array:
  """q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]."""
  impl = resolve_implementation(implementation, q.dtype)
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, implementation=impl)
