"""Expert parallelism for the `dropless` dispatch: experts sharded over the mesh axis `expert`,
tokens over the batch axes, one all-to-all each way (as in GShard, DeepSpeed-MoE, MegaBlocks).

The routing is computed before, under GSPMD, on the global tokens. Then per device, inside
`jax.shard_map`, with ep = the size of `expert` and E_loc = E / ep local experts (expert e lives
on expert-axis index e // E_loc):
  1. sort its T_loc·k assignments by expert, as `dispatch.dropless` does;
  2. send each assignment's row to the device owning its expert (an all-to-all over `expert`);
     the receiver holds them grouped by local expert;
  3. run the three grouped matmuls over its E_loc experts;
  4. send the results back the same way, unsort, and combine in float32 as `dropless` does.
The result (forward and gradients) equals `dispatch.dropless` on one device up to float
summation order.

Exchanges (`exchange`):
  ragged  `jax.lax.ragged_all_to_all`: one slice per (source, expert), written straight to its
          place in the receiver's buffer, which is then already grouped by local expert; only
          assigned rows travel. The offsets come from an all_gather of every device's
          per-expert counts ([ep, E] int32). XLA:CPU does not implement the op, so on CPU this
          path is tested with `ragged_all_to_all_reference` injected, and the real op is only
          lowered, never run: the real op on a multi-device GPU/TPU mesh is UNVERIFIED here.
  padded  `jax.lax.all_to_all` of fixed [ep, cap, d] buffers, one slot of `cap` rows per
          destination, then a stable sort of the received rows by local expert. Sends ep·cap
          rows per device each way whatever the load: the CPU path, and a fallback.
Both are dropless. cap = T_loc·min(k, E_loc) is the most one device can receive from another (a
token's k experts are distinct, so at most min(k, E_loc) of them live on one device), and the
receive buffer holds ep·cap rows: the worst case, every token of the expert group choosing this
device. That bound, not the actual load, sets the activation memory of the expert matmuls.

Other mesh axes: the token axes are the logical 'batch' axes (plus `expert`, if the rules leave
it out, so no two expert-axis devices hold the same tokens). When the `tensor` axis (size
tp > 1) divides the expert width f, each device keeps f / tp columns of gate and up and rows of
down (Megatron-style) and the down projection is psum'd over `tensor` in float32; otherwise the
weights are gathered over it. The weights' `embed` dim (fsdp) is gathered by the in_specs, as
FSDP does for every weight.
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from efficientjax.errors import ConfigError
from efficientjax.moe.dispatch import grouped_matmul
from efficientjax.moe.router import Routing
from efficientjax.parallel.mesh import LOGICAL_AXIS_RULES

EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'
EXCHANGES = ('ragged', 'padded')


def expert_axis_size(mesh=None) -> int:
  """The size of the mesh axis `expert` (1 when there is none); mesh None: the current one."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return dict(mesh.shape)[EXPERT_AXIS]


def default_exchange(backend: str | None = None) -> str:
  """'padded' on CPU (XLA:CPU has no ragged-all-to-all), 'ragged' on GPU and TPU."""
  return 'padded' if (backend or jax.default_backend()) == 'cpu' else 'ragged'


def token_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the tokens are split over: the logical 'batch' axes, then `expert`."""
  rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  spec = nn.logical_to_mesh_axes(('batch',), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  return axes if EXPERT_AXIS in axes else (*axes, EXPERT_AXIS)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name: str) -> jax.Array:
  """`jax.lax.ragged_all_to_all`'s semantics (its docstring, jax 0.10) from all_gather and
  gathers: runs on any backend, for testing the ragged exchange's offsets on CPU.

  With K = len(input_offsets) entries and n = axis size, entry i of a sender goes to device
  i // (K/n): rows operand[input_offsets[i] : + send_sizes[i]] are written on that receiver at
  output_offsets[i] (an offset in the RECEIVER's buffer). The receiver takes the sizes from its
  own recv_sizes: entry s·(K/n) + j is the size of the j-th slice from source s. Rows of
  `output` nobody writes keep their value. The gradient is jax's own transpose rule for the
  real op (a ragged_all_to_all with offsets and sizes swapped), so a test through this also
  checks that rule's use of our offsets.
  """
  return _ragged_reference(operand, output, input_offsets, send_sizes, output_offsets,
                           recv_sizes, axis_name)


def _ragged_reference_impl(operand, output, input_offsets, send_sizes, output_offsets,
                           recv_sizes, axis_name):
  del send_sizes  # the receiver's recv_sizes say how much arrives (they must agree)
  n = jax.lax.axis_size(axis_name)
  per = input_offsets.shape[0] // n
  me = jax.lax.axis_index(axis_name)

  def addressed_to_me(v):  # [n, per]: each source's entries whose destination is this device
    return jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(v, axis_name), me * per, per, axis=1)

  starts, offsets = addressed_to_me(input_offsets), addressed_to_me(output_offsets)
  sizes = recv_sizes.reshape(n, per)
  rows = jnp.arange(operand.shape[0])
  src = jnp.clip(starts[..., None] + rows, 0, operand.shape[0] - 1)       # [n, per, N]
  dst = jnp.where(rows < sizes[..., None], offsets[..., None] + rows, output.shape[0])
  data = jax.lax.all_gather(operand, axis_name)[jnp.arange(n)[:, None, None], src]
  return output.at[dst.reshape(-1)].set(data.reshape(-1, *operand.shape[1:]), mode='drop')


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ragged_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      axis_name):
  return _ragged_reference_impl(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, axis_name)


def _ragged_reference_fwd(operand, output, input_offsets, send_sizes, output_offsets,
                          recv_sizes, axis_name):
  out = _ragged_reference_impl(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, axis_name)
  # Size-0 slices stand in for operand and output: their length, dtype and the mesh axes
  # they vary over (residuals must be arrays).
  like_operand = operand.reshape(operand.shape[0], -1)[:, :0]
  return out, (like_operand, output.reshape(-1)[:0], input_offsets, send_sizes, output_offsets,
               recv_sizes)


def _ragged_reference_bwd(axis_name, residuals, t):
  like_operand, like_output, input_offsets, send_sizes, output_offsets, recv_sizes = residuals
  # jax/_src/lax/parallel.py `_ragged_all_to_all_transpose`: send back from where the rows
  # landed (all_to_all of output_offsets) to where they were taken (all_to_all of input_offsets).
  a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0,
                          tiled=True)
  args = (a2a(output_offsets), recv_sizes, a2a(input_offsets), send_sizes)
  zeros = jnp.zeros((like_operand.shape[0], *t.shape[1:]), like_operand.dtype)
  operand_t = _ragged_reference_impl(t, zeros, *args, axis_name)
  written = _ragged_reference_impl(
      jnp.ones(t.shape[:1], jnp.int32), jnp.zeros(t.shape[:1], jnp.int32), input_offsets,
      send_sizes, output_offsets, recv_sizes, axis_name)
  output_t = jnp.where((written > 0).reshape(-1, *(1,) * (t.ndim - 1)), 0, t)
  return _like(operand_t, like_operand), _like(output_t, like_output), None, None, None, None


def _like(cotangent, primal):
  """Sums a cotangent over the mesh axes its primal does not vary over (under shard_map): the
  transpose of the implicit broadcast of an invariant primal."""
  axes = tuple(_varying_axes(cotangent) - _varying_axes(primal))
  return jax.lax.psum(cotangent, axes) if axes else cotangent


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  if hasattr(aval, 'vma'):  # jax <= 0.9
    return frozenset(aval.vma)
  return frozenset(aval.manual_axis_type.varying)  # jax 0.10


_ragged_reference.defvjp(_ragged_reference_fwd, _ragged_reference_bwd)


def _exchange_padded(rows, dest, counts, cap, *, ep):
  """Dense all_to_all of [ep, cap, d] slots. rows [A, d] sorted by expert, dest [A] their
  expert-axis device, counts [E] per expert. -> (received rows [ep·cap, d] grouped by local
  expert, group sizes [E_loc], back: results [ep·cap, ·] -> [A, ·] in `rows`' order)."""
  a = rows.shape[0]
  e_loc = counts.shape[0] // ep
  per_dest = counts.reshape(ep, e_loc).sum(axis=1)
  start = jnp.cumsum(per_dest) - per_dest
  slot = jnp.arange(cap)
  taken = slot[None] < per_dest[:, None]                                   # [ep, cap]
  send = jnp.where(taken[..., None], rows[jnp.minimum(start[:, None] + slot, a - 1)], 0)
  a2a = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0,
                          concat_axis=0, tiled=True)
  recv = a2a(send)                                     # recv[s]: what source s sent here
  recv_counts = a2a(counts.reshape(ep, e_loc))         # [ep, E_loc] per source, local expert
  # A received row's local expert, from its source's counts; empty slots get E_loc (last).
  ends = jnp.cumsum(recv_counts, axis=1)
  local = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1)       # [ep, cap]
  order = jnp.argsort(local.reshape(-1), stable=True)
  grouped = recv.reshape(ep * cap, -1)[order]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))

  def back(out):
    returned = a2a(out[inverse].reshape(ep, cap, -1))  # returned[j]: results from device j
    return returned[dest, jnp.arange(a) - start[dest]]

  return grouped, recv_counts.sum(axis=0), back


def _exchange_ragged(rows, dest, counts, cap, *, ep, ragged_all_to_all):
  """ragged_all_to_all, one slice per global expert (K = E entries, E_loc per destination).
  Same contract as `_exchange_padded`."""
  del dest
  a, e = rows.shape[0], counts.shape[0]
  e_loc = e // ep
  me = jax.lax.axis_index(EXPERT_AXIS)
  every = jax.lax.all_gather(counts, EXPERT_AXIS)        # [ep, E]: source s's rows of expert e
  total = every.sum(axis=0)                              # [E]
  by_device = total.reshape(ep, e_loc)
  # On its device, expert e's rows start at base[e] (local experts in order) and within that,
  # source s's rows after those of sources < s: the buffer comes out grouped by local expert.
  base = (jnp.cumsum(by_device, axis=1) - by_device).reshape(e)
  before = jnp.cumsum(every, axis=0) - every             # [ep, E]
  taken_at = jnp.cumsum(every, axis=1) - every           # [ep, E]: in source s's sorted rows

  def mine(m):  # the columns of this device's experts
    return jax.lax.dynamic_slice_in_dim(m, me * e_loc, e_loc, axis=-1)

  recv_sizes = mine(every).reshape(-1)                   # entry s·E_loc + l
  recv = ragged_all_to_all(
      rows, jnp.zeros((ep * cap, rows.shape[1]), rows.dtype), taken_at[me], counts,
      base + before[me], recv_sizes, axis_name=EXPERT_AXIS)

  def back(out):
    # Entry s·E_loc + l: the slice source s sent for local expert l goes home.
    return ragged_all_to_all(
        out, jnp.zeros((a, out.shape[1]), out.dtype), (mine(base) + mine(before)).reshape(-1),
        recv_sizes, mine(taken_at).reshape(-1), counts, axis_name=EXPERT_AXIS)

  return recv, mine(total), back


def dropless_expert_parallel(x: jax.Array, weights: dict, routing: Routing, cfg, *, dtype,
                             mesh=None, exchange: str | None = None, interpret: bool = False,
                             ragged_all_to_all: Callable | None = None
                             ) -> tuple[jax.Array, dict]:
  """`dispatch.dropless` with the experts sharded over the mesh axis `expert`.

  x [T, d] (rows in batch-major order, as the MoE block flattens [batch, length, embed]),
  weights {'gate': [E, d, f], 'up': [E, d, f], 'down': [E, f, d]} (global shapes: jit reshards
  them to the in_specs), routing over the T tokens; returns (y [T, d] in `dtype`, stats) as
  every DISPATCH entry does. mesh None: the current mesh (parallel.activate). exchange: one of
  EXCHANGES, None for `default_exchange()`. ragged_all_to_all: the collective the 'ragged'
  exchange calls (default jax.lax.ragged_all_to_all; tests inject
  `ragged_all_to_all_reference`).
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  ep = expert_axis_size(mesh)
  e, k = cfg.num_experts, cfg.top_k
  _, d, f = weights['gate'].shape
  if (weights['gate'].shape[0] != e or weights['up'].shape != (e, d, f)
      or weights['down'].shape != (e, f, d) or x.ndim != 2 or x.shape[1] != d
      or routing.experts.shape != (x.shape[0], k)):
    raise ValueError(f'dropless_expert_parallel: want x [T, d], gate/up [E={e}, d, f], down '
                     f'[E, f, d], routing.experts [T, k={k}]; got x {x.shape}, gate '
                     f'{weights["gate"].shape}, up {weights["up"].shape}, down '
                     f'{weights["down"].shape}, experts {routing.experts.shape}')
  if e % ep:
    raise ConfigError('mesh.expert', f'{ep} devices cannot hold an equal share of '
                      f'model.moe.num_experts={e}; use a divisor')
  exchange = default_exchange() if exchange is None else exchange
  if exchange not in EXCHANGES:
    raise ValueError(f'dropless_expert_parallel: unknown exchange {exchange!r}; valid: '
                     f'{", ".join(EXCHANGES)}')
  axes = token_axes(mesh)
  shards = math.prod(dict(mesh.shape)[a] for a in axes)
  t = x.shape[0]
  experts, combine = routing.experts.astype(jnp.int32), routing.weights.astype(jnp.float32)
  pad = -t % shards
  if pad:  # filler tokens: zero rows, distinct experts (the cap bound needs that), weight 0
    x = jnp.pad(x, ((0, pad), (0, 0)))
    experts = jnp.concatenate([experts, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32),
                                                         (pad, k))])
    combine = jnp.pad(combine, ((0, pad), (0, 0)))
  tp = dict(mesh.shape).get(TENSOR_AXIS, 1)
  tensor = TENSOR_AXIS if tp > 1 and f % tp == 0 and TENSOR_AXIS not in axes else None

  if exchange == 'padded':
    exchange_fn = functools.partial(_exchange_padded, ep=ep)
  else:
    exchange_fn = functools.partial(_exchange_ragged, ep=ep, ragged_all_to_all=(
        jax.lax.ragged_all_to_all if ragged_all_to_all is None else ragged_all_to_all))

  def local(x, experts, combine, gate, up, down):
    t_loc = x.shape[0]
    e_loc = gate.shape[0]
    flat = experts.reshape(-1)                                 # token-major [T_loc·k]
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=e).astype(jnp.int32)
    rows = x.astype(dtype)[order // k]                         # sorted by expert
    recv, group_sizes, back = exchange_fn(rows, flat[order] // e_loc, counts,
                                          t_loc * min(k, e_loc))

    def gmm(lhs, rhs, out_dtype=None):
      return grouped_matmul(lhs, rhs.astype(dtype), group_sizes, cfg.grouped_matmul,
                            preferred_element_type=out_dtype, interpret=interpret)

    h = nn.silu(gmm(recv, gate)) * gmm(recv, up)
    if tensor:  # partial sums over this device's f / tp columns: add them in float32
      out = jax.lax.psum(gmm(h, down, jnp.float32), tensor).astype(dtype)
    else:
      out = gmm(h, down)
    out = back(out)                                            # [T_loc·k, d], sorted order
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out[inverse].reshape(t_loc, k, -1)
    return jnp.einsum('tkd,tk->td', out.astype(jnp.float32), combine).astype(dtype)

  tokens = P(axes, None)
  in_specs = (tokens, tokens, tokens, P(EXPERT_AXIS, None, tensor), P(EXPERT_AXIS, None, tensor),
              P(EXPERT_AXIS, tensor, None))
  # Under jit, GSPMD reshards the arguments to the in_specs (also when called eagerly).
  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tokens))
  y = run(x, experts, combine, weights['gate'], weights['up'], weights['down'])
  return y[:t], {'dropped_fraction': jnp.zeros((), jnp.float32)}
