"""AWQ's activation-aware scale search (Lin et al. 2023, arXiv 2306.00978, §3.2) for one matrix.

Input channels that carry large activations matter most; scaling their weight rows up by s
before round-to-nearest (and the input down by s) shrinks their relative rounding error. With
s = s_x^α, s_x the mean |x| per input channel over the calibration tokens, α is chosen on a grid
{0, 1/n, ..., 1} to minimise the layer's output error on the calibration tokens,

  ‖x·W − (x/s)·Q(s·W)‖²  (mean over a token subsample and the outputs).

As in the reference code (github.com/mit-han-lab/llm-awq, `auto_scale._search_module_scale`),
s = clamp(s_x^α, 1e-4) / sqrt(max · min) of it. α = 0 gives s = 1 (plain round-to-nearest), so
on the subsample the search never does worse than RTN. The reference searches one s for the
linears that share an input (folded into the norm before them) and then also searches weight
clipping (`auto_clip`); here each Linear gets its own s, stored in its container, and there is
no clipping search.
"""

import functools

import jax
import jax.numpy as jnp

from efficientjax.quant.formats import fake_quantize

HIGHEST = jax.lax.Precision.HIGHEST


def scales_for(x_mean: jax.Array, alpha: jax.Array) -> jax.Array:
  """AWQ's s for one α: clamp(s_x^α, 1e-4), normalised by sqrt(max · min)."""
  s = jnp.maximum(x_mean.astype(jnp.float32) ** alpha, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=('kind', 'bits', 'group_size', 'symmetric',
                                             'scale_dtype', 'grid'))
def search(w: jax.Array, x_mean: jax.Array, x_sample: jax.Array, *, kind: str, bits: int,
           group_size: int, symmetric: bool, scale_dtype='bfloat16', grid: int = 20
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """w [in, out], x_mean [in] (mean |x|), x_sample [n, in] -> (s [in], the best α, the error of
  every α on the grid [grid + 1])."""
  w = w.astype(jnp.float32)
  x = x_sample.astype(jnp.float32)
  y = jnp.matmul(x, w, precision=HIGHEST)
  alphas = jnp.arange(grid + 1, dtype=jnp.float32) / grid

  def error(alpha):
    s = scales_for(x_mean, alpha)
    w_hat = fake_quantize(w * s[:, None], kind, bits=bits, group_size=group_size,
                          symmetric=symmetric, scale_dtype=scale_dtype) / s[:, None]
    return jnp.mean(jnp.square(jnp.matmul(x, w_hat, precision=HIGHEST) - y))

  errors = jax.lax.map(error, alphas)
  best = jnp.argmin(errors)  # the first of equal errors: the smallest α
  return scales_for(x_mean, alphas[best]), alphas[best], errors
