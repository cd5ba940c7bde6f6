"""`execution = jit | eager`: how a run's steps execute.

jit: each step is one compiled program (`jax.jit`, compiled ahead of time): XLA fuses its
elementwise work, plans its buffers, reuses the donated state's.

eager: the same step function, called under `jax.disable_jit()`: Python walks it op by op and
JAX dispatches every primitive on its own. Each primitive is still compiled by XLA (once per
shape and sharding, cached), so eager is not interpreted; what it lacks is everything XLA does
across ops: no fusion (every intermediate is a buffer in device memory), no buffer planning
or donation (the old state lives until the new one exists), and one dispatch per primitive
from the host. `lax.scan` (the layer stack, gradient accumulation) runs as a Python loop.
A Pallas kernel is one primitive: it runs as the same kernel in both modes (pallas_call
re-enables jit for its own lowering). A `shard_map` body runs op by op too, each primitive
over every shard (the expert-parallel MoE exchange: correct, and very slow).

The difference between the two is what compiler fusion buys; the report's eager-vs-jit table
is built from pairs of records that differ only in `execution`.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax

from efficientjax.metrics.record import config_hash

EXECUTIONS = ('jit', 'eager')


class EagerStep:
  """`fn` run op by op under `jax.disable_jit()`, its outputs placed as a jitted step's
  `out_shardings` would place them (None: where the ops left them).

  Without the placement an eager step's outputs keep whatever sharding each primitive's
  propagation chose (an equivalent spec at best, replicated at worst), and the next step, a
  checkpoint or the memory sampler would see a state laid out unlike the run's mesh says.
  """

  def __init__(self, fn: Callable[..., Any], out_shardings: Any = None):
    self.fn, self.out_shardings = fn, out_shardings

  def __call__(self, *args: Any) -> Any:
    with jax.disable_jit():
      out = self.fn(*args)
    if self.out_shardings is not None:
      out = jax.device_put(out, self.out_shardings)
    return out


def record(config: Mapping[str, Any]) -> dict[str, Any]:
  """The record's `execution` section: the mode, and `pair_hash`, the config's hash without
  `execution` and `study` (docs/metrics.md): a jit and an eager run of the same config (and
  seed) share it, wherever a sweep placed them, so a report pairs them by it."""
  rest = {k: v for k, v in config.items() if k not in ('execution', 'study')}
  return {'mode': 'eager' if is_eager(config) else 'jit', 'pair_hash': config_hash(rest)}


def is_eager(config: Any) -> bool:
  """The run config's `execution` (absent in configs older than the field: jit)."""
  mode = config.get('execution') or 'jit'
  if mode not in EXECUTIONS:
    raise ValueError(f'execution={mode!r}; valid: {", ".join(EXECUTIONS)}')
  return mode == 'eager'
