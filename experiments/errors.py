"""How far a benchmarked kernel's output is from its reference: the reductions the benchmarks'
correctness checks share.

Jitted so that each fuses into one reduction: eagerly, the float32 copy of DeepSeek-V3's weight
gradient alone took 14 GiB and bench_moe_gmm's checks of the V3 rows ran out of memory on an H100.
"""

import jax
import jax.numpy as jnp


@jax.jit
def max_abs_diff(x, y):
  return jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


@jax.jit
def max_abs(x):
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


def rel_err(got, want) -> float:
  """max |got - want| / max |want|: one number per output, scaled by the reference's size."""
  return float(max_abs_diff(got, want)) / (float(max_abs(want)) + 1e-30)
