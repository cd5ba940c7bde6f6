"""Dispatch strategies: tokens to their routed SwiGLU experts and back (`model.moe.dispatch`).

Every entry of DISPATCH has one signature,

    fn(x [T, d], weights {'gate': [E, d, f], 'up': [E, d, f], 'down': [E, f, d]},
       routing: Routing, cfg: MoEConfig, *, dtype, interpret=False) -> (y [T, d], stats)

computing y[t] = Σⱼ routing.weights[t, j] · expertₑ(x[t]) over the chosen experts
e = routing.experts[t, j], with expertₑ(x) = down[e]ᵀ(silu(gate[e]ᵀx) · up[e]ᵀx). Matmuls run in
`dtype` (accumulating as the backend does; the expert outputs are rounded to `dtype`, as the
dense MLP's are, because CPU XLA has no bf16 x bf16 -> f32 dot), the combine runs in float32,
and y is returned in `dtype`. stats['dropped_fraction'] (float32 scalar) is the share of
the T·k assignments that were not computed (0 except for `capacity`). A dropped assignment
contributes zero: the block's residual carries the token past the layer.

  dense     every expert runs every token; the combine weights are zero outside the top-k.
            E/k times the FLOPs: the reference, and fine for a handful of experts.
  capacity  GShard/Switch: each expert has C slots, assignments past them are dropped; one-hot
            dispatch [T, E, C] and combine tensors, batched einsums (static shapes: shards over
            `expert` under GSPMD).
  dropless  MegaBlocks-style: the T·k assignments sorted by expert, three grouped matmuls
            (cfg.grouped_matmul picks the kernel), unsorted and combined. Nothing drops.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.moe.router import Routing
from efficientjax.registry import Registry
from kernels import moe_gmm

DISPATCH = Registry('model.moe.dispatch')
GROUPED_MATMULS = ('auto', 'autotune', 'ragged_dot', 'triton', 'mosaic_gpu', 'tokamax',
                   'reference')


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = 'auto',
                   *, preferred_element_type=None, interpret: bool = False,
                   tiling: dict | None = None) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)] for rows sorted by group; lhs [m, k], rhs [g, k, n].

  impl (model.moe.grouped_matmul):
    auto        kernels.moe_gmm.gmm's backend default (implementation=None);
    autotune    on a GPU, the fastest correct kernel and tiling per shape among kernels.moe_gmm's
                (timed once at the first trace, cached on disk: kernels/moe_gmm/autotune.py);
                elsewhere as 'auto';
    ragged_dot  jax.lax.ragged_dot;
    triton      kernels.moe_gmm's Pallas-Triton kernels (a GPU, or interpret=True anywhere);
    mosaic_gpu  kernels.moe_gmm's Pallas Mosaic GPU kernels (Hopper: TMA + wgmma; bf16/fp16);
    tokamax     tokamax.ragged_dot (its own backend choice), when tokamax is installed;
    reference   kernels.moe_gmm's plain-jnp specification (slow; for tests).
  Returns `preferred_element_type` (default lhs's dtype).
  """
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  if impl in ('auto', 'autotune', 'triton', 'mosaic_gpu', 'reference'):
    if impl == 'autotune' and not interpret:
      tiling = 'autotune'
    return moe_gmm.gmm(lhs, rhs, group_sizes,
                       implementation=None if impl in ('auto', 'autotune') else impl,
                       preferred_element_type=out_dtype, interpret=interpret, tiling=tiling)
  if impl == 'tokamax':
    try:
      import tokamax  # pylint: disable=g-import-not-at-top  (optional dependency)
    except ImportError as e:
      raise ConfigError('model.moe.grouped_matmul',
                        "'tokamax' needs the tokamax package: pip install tokamax (or pick "
                        "'auto' / 'ragged_dot')") from e
    return tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  raise ConfigError('model.moe.grouped_matmul',
                    f'unknown value {impl!r}; valid values: {", ".join(GROUPED_MATMULS)}')


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor · tokens · top_k / num_experts), at most `tokens`.

  The product is rounded to 9 decimals before the ceiling so float noise (0.1·30 =
  3.0000000000000004) cannot add a slot. An expert never receives more than `tokens`
  assignments (a token's k experts are distinct), so more slots would only be padding.
  """
  if capacity_factor <= 0:
    raise ConfigError('model.moe.capacity_factor', f'must be > 0, got {capacity_factor}')
  slots = math.ceil(round(capacity_factor * tokens * top_k / num_experts, 9))
  return max(1, min(slots, tokens))


def _check(x: jax.Array, weights: dict, routing: Routing, cfg) -> tuple[int, int]:
  e, d, f = weights['gate'].shape
  if (e != cfg.num_experts or weights['up'].shape != (e, d, f)
      or weights['down'].shape != (e, f, d) or x.ndim != 2 or x.shape[1] != d):
    raise ValueError(f'moe dispatch: want x [T, d], gate/up [E={cfg.num_experts}, d, f], down '
                     f'[E, f, d]; got x {x.shape}, gate {weights["gate"].shape}, up '
                     f'{weights["up"].shape}, down {weights["down"].shape}')
  if routing.experts.shape != (x.shape[0], cfg.top_k):
    raise ValueError(f'moe dispatch: routing.experts {routing.experts.shape} does not match '
                     f'{x.shape[0]} tokens and top_k={cfg.top_k}')
  return x.shape[0], e


def _no_drops() -> dict:
  return {'dropped_fraction': jnp.zeros((), jnp.float32)}


@DISPATCH.register('dense')
def dense(x: jax.Array, weights: dict, routing: Routing, cfg, *, dtype,
          interpret: bool = False) -> tuple[jax.Array, dict]:
  """Every expert on every token, combined with weights that are zero off the top-k."""
  del interpret
  t, e = _check(x, weights, routing, cfg)
  x = x.astype(dtype)
  gate = jnp.einsum('td,edf->tef', x, weights['gate'].astype(dtype))
  up = jnp.einsum('td,edf->tef', x, weights['up'].astype(dtype))
  out = jnp.einsum('tef,efd->ted', nn.silu(gate) * up, weights['down'].astype(dtype))
  combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], routing.experts].add(
      routing.weights.astype(jnp.float32))
  y = jnp.einsum('ted,te->td', out.astype(jnp.float32), combine)
  return y.astype(dtype), _no_drops()


@DISPATCH.register('capacity')
def capacity(x: jax.Array, weights: dict, routing: Routing, cfg, *, dtype,
             interpret: bool = False) -> tuple[jax.Array, dict]:
  """GShard/Switch capacity-limited dispatch (Lepikhin et al. 2020 Alg. 1; Fedus et al. 2021).

  Slots are filled by priority: every token's first choice, in token order, before any
  token's second choice, and so on (GShard's rule for top-2, generalised to k): a token's
  best expert is the last to be dropped. C = expert_capacity(T, k, E, capacity_factor).
  """
  del interpret
  t, e = _check(x, weights, routing, cfg)
  k = cfg.top_k
  c = expert_capacity(t, k, e, cfg.capacity_factor)
  # Slot-major order [k·T]: all first choices, then all second choices, ...
  experts = routing.experts.T.reshape(-1)
  chosen = jax.nn.one_hot(experts, e, dtype=jnp.int32)                   # [k·T, E]
  position = jnp.sum((jnp.cumsum(chosen, axis=0) - 1) * chosen, axis=-1)  # within its expert
  kept = position < c
  slot = jnp.where(kept, experts * c + position, -1)  # -1: one_hot gives a zero row
  sel = jax.nn.one_hot(slot, e * c, dtype=jnp.float32).reshape(k, t, e, c)
  dispatch = jnp.sum(sel, axis=0)                                          # [T, E, C] 0/1
  combine = jnp.einsum('ktec,kt->tec', sel, routing.weights.T.astype(jnp.float32))

  x = x.astype(dtype)
  expert_in = jnp.einsum('tec,td->ecd', dispatch.astype(dtype), x)
  expert_in = nn.with_logical_constraint(expert_in, ('expert', None, 'embed'))
  gate = jnp.einsum('ecd,edf->ecf', expert_in, weights['gate'].astype(dtype))
  up = jnp.einsum('ecd,edf->ecf', expert_in, weights['up'].astype(dtype))
  h = nn.with_logical_constraint(nn.silu(gate) * up, ('expert', None, 'mlp'))
  out = jnp.einsum('ecf,efd->ecd', h, weights['down'].astype(dtype))
  out = nn.with_logical_constraint(out, ('expert', None, 'embed'))
  y = jnp.einsum('tec,ecd->td', combine, out.astype(jnp.float32))
  dropped = jnp.sum(~kept).astype(jnp.float32) / kept.size  # a count: exactly 0 when none
  return y.astype(dtype), {'dropped_fraction': dropped}


@DISPATCH.register('dropless')
def dropless(x: jax.Array, weights: dict, routing: Routing, cfg, *, dtype,
             interpret: bool = False) -> tuple[jax.Array, dict]:
  """Sort the T·k assignments by expert, grouped matmuls, unsort, combine (Gale et al. 2022).

  The sort is stable, so within an expert rows keep token order; `interpret` runs the
  'triton' grouped matmul in Pallas' interpreter (CPU tests).
  """
  t, e = _check(x, weights, routing, cfg)
  k = cfg.top_k
  experts = routing.experts.reshape(-1)                     # token-major [T·k]
  order = jnp.argsort(experts, stable=True)
  group_sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
  rows = x.astype(dtype)[order // k]                        # [T·k, d] sorted by expert

  def gmm(lhs, rhs):
    return grouped_matmul(lhs, rhs.astype(dtype), group_sizes, cfg.grouped_matmul,
                          interpret=interpret)

  h = nn.silu(gmm(rows, weights['gate'])) * gmm(rows, weights['up'])
  out = gmm(h, weights['down'])
  # Back to token-major by gathering with the inverse permutation: no float scatter-add,
  # so the combine is deterministic on every backend.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = out[inverse].reshape(t, k, -1)
  y = jnp.einsum('tkd,tk->td', out.astype(jnp.float32), routing.weights.astype(jnp.float32))
  return y.astype(dtype), _no_drops()
