"""The MoE feed-forward block (`model.ffn = 'moe'`): a router, routed SwiGLU experts run by a
dispatch strategy, optional shared experts, and the balancing terms.

What the block leaves beside its output, in Flax variable collections (the model scans them
with the layers, so each gets a leading layer axis):
- `losses`: the weighted balancing losses of this call, which the training step adds to the
  cross-entropy (`efficientjax.model.auxiliary_loss`);
- `moe_stats`: what the record reports (expert load, dropped fraction, each loss unweighted);
- `moe_state`: the auxiliary-loss-free balancing bias (DeepSeek-V3), not a parameter: the
  training step updates it from the load after each optimizer step, and it is checkpointed with
  the train state.
The losses and stats are only written when the caller asks for them (`mutable=[...]`), so
inference and evaluation pay nothing.

Routing is per token, so `dense` and `dropless` give a token the same output whatever else is in
the batch (prefill + decode equals the full forward pass); `capacity` does not: which
assignments it drops depends on the other tokens of the call.
"""

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.moe import balance, expert_parallel
from efficientjax.moe.dispatch import DISPATCH, GROUPED_MATMULS
from efficientjax.moe.router import ROUTERS, route
from efficientjax.moe.router import check as check_router
from efficientjax.nn.linear import Linear
from efficientjax.nn.mlp import FFN, MLP

LOSSES = 'losses'
STATS = 'moe_stats'
STATE = 'moe_state'


def shared_width(moe) -> int:
  """The shared experts' summed hidden width (0 without them); moe: a resolved MoEConfig."""
  if not moe.num_shared_experts:
    return 0
  if moe.shared_expert_dim is not None:
    return moe.shared_expert_dim
  return moe.num_shared_experts * moe.expert_dim


@FFN.register('moe')
class MoE(nn.Module):
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @staticmethod
  def flops_per_token(cfg) -> float:
    """Forward model FLOPs per token: the router, the top-k routed experts, the shared ones and
    their gate (what a token needs; the `dense` strategy executes all experts, `capacity` its
    padding)."""
    moe = cfg.moe
    swiglu = lambda width: 2.0 * 3 * cfg.embed_dim * width
    gate = 2.0 * cfg.embed_dim if moe.num_shared_experts and moe.shared_expert_gate else 0.0
    return (2.0 * cfg.embed_dim * moe.num_experts + swiglu(moe.expert_dim) * moe.top_k
            + swiglu(shared_width(moe)) + gate)

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    """The `model.moe` fields, before anything is built (m: the config's model section)."""
    del seq_len
    moe, errors = m['moe'], []
    for registry, field in ((ROUTERS, 'router'), (DISPATCH, 'dispatch')):
      if moe[field] not in registry:
        errors.append(ConfigError(f'model.moe.{field}', f'unknown value {moe[field]!r}; valid '
                                  f'values: {", ".join(registry)}'))
    if moe['grouped_matmul'] not in GROUPED_MATMULS:
      errors.append(ConfigError('model.moe.grouped_matmul', f'unknown value '
                                f'{moe["grouped_matmul"]!r}; valid values: '
                                f'{", ".join(GROUPED_MATMULS)}'))
    for field in ('num_experts', 'top_k', 'num_groups', 'topk_groups'):
      if moe[field] < 1:
        errors.append(ConfigError(f'model.moe.{field}', f'must be at least 1, got {moe[field]}'))
    if moe['expert_dim'] is not None and moe['expert_dim'] < 1:
      errors.append(ConfigError('model.moe.expert_dim', 'must be positive, or unset for '
                                'model.mlp_dim'))
    if not 0 <= moe['first_dense_layers'] < m['num_layers']:
      errors.append(ConfigError('model.moe.first_dense_layers', f'must lie in [0, '
                                f'model.num_layers={m["num_layers"]}), got '
                                f'{moe["first_dense_layers"]}; a model with no MoE layer is '
                                "model.ffn='dense'", {'model.ffn': 'dense'}))
    if moe['num_shared_experts'] < 0:
      errors.append(ConfigError('model.moe.num_shared_experts', 'must be 0 or more'))
    if moe['shared_expert_dim'] is not None and moe['shared_expert_dim'] < 1:
      errors.append(ConfigError('model.moe.shared_expert_dim', 'must be positive, or unset for '
                                'num_shared_experts × expert_dim'))
    # Without shared experts these would configure nothing: say so rather than ignore them.
    for field, unset in (('shared_expert_dim', None), ('shared_expert_gate', False)):
      if moe['num_shared_experts'] == 0 and moe[field] != unset:
        errors.append(ConfigError(f'model.moe.{field}', f'{moe[field]!r} shapes the shared '
                                  'experts, but model.moe.num_shared_experts is 0; set '
                                  f'num_shared_experts or unset {field}',
                                  {f'model.moe.{field}': unset}))
    if moe['capacity_factor'] <= 0:
      errors.append(ConfigError('model.moe.capacity_factor', f'must be positive, got '
                                f'{moe["capacity_factor"]}'))
    for field in ('aux_loss_coef', 'z_loss_coef', 'seq_aux_loss_coef', 'bias_update_rate'):
      if moe[field] < 0:
        errors.append(ConfigError(f'model.moe.{field}', f'must be 0 or more, got {moe[field]}'))
    if not errors:
      try:
        check_router(types.SimpleNamespace(**moe))  # the fields it reads, as attributes
      except ConfigError as e:
        errors.append(e)
    return errors

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, moe = self.config, self.config.moe
    batch, length, embed = x.shape
    tokens = x.reshape(batch * length, embed)
    num_experts, f = moe.num_experts, moe.expert_dim

    # Routing in float32 whatever the compute dtype: top-k over near-ties in bf16 would make
    # the selection depend on rounding.
    router = self.param('router', nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ('embed', 'router')), (embed, num_experts),
        cfg.param_dtype)
    logits = jnp.dot(tokens.astype(jnp.float32), router.astype(jnp.float32))
    bias = None
    if moe.aux_free:
      bias = self.variable(STATE, 'bias', jnp.zeros, (num_experts,), jnp.float32).value
    routing = route(logits, moe, bias)

    init = nn.initializers.normal(cfg.init_std)
    expert = lambda name, axes, shape: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
    weights = {'gate': expert('gate', ('expert', 'embed', 'mlp'), (num_experts, embed, f)),
               'up': expert('up', ('expert', 'embed', 'mlp'), (num_experts, embed, f)),
               'down': expert('down', ('expert', 'mlp', 'embed'), (num_experts, f, embed))}
    weights = {k: w.astype(cfg.dtype) for k, w in weights.items()}
    if moe.dispatch == 'dropless' and expert_parallel.expert_axis_size() > 1:
      # Sharded experts need explicit per-device code (all-to-alls); dense and capacity are
      # einsums that GSPMD shards from their logical constraints.
      y, dispatch_stats = expert_parallel.dropless_expert_parallel(tokens, weights, routing, moe,
                                                                   dtype=cfg.dtype)
    else:
      y, dispatch_stats = DISPATCH.get(moe.dispatch)(tokens, weights, routing, moe,
                                                     dtype=cfg.dtype)
    y = y.reshape(batch, length, embed)
    if moe.num_shared_experts:
      # Shared experts see every token, so they are one dense SwiGLU of their summed width.
      shared = MLP(dataclasses.replace(cfg, mlp_dim=shared_width(moe)), name='shared')(x)
      if moe.shared_expert_gate:
        # Qwen2-MoE: a per-token scalar gate sigmoid(x·w), w [embed], on the shared output.
        gate = Linear((), ('embed',), name='shared_gate', dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      kernel_init=nn.initializers.normal(cfg.init_std))(x)
        shared = jax.nn.sigmoid(gate)[..., None] * shared
      y = y + shared

    if self.is_mutable_collection(LOSSES) or self.is_mutable_collection(STATS):
      self._record(routing, dispatch_stats, batch, length)
    return nn.with_logical_constraint(y, ('batch', 'length', 'embed'))

  def _record(self, routing, dispatch_stats, batch: int, length: int) -> None:
    moe = self.config.moe
    num_experts = moe.num_experts
    load = balance.expert_load(routing.experts, num_experts)
    terms = {
        'aux_loss': balance.load_balancing_loss(routing.probs, routing.experts, num_experts),
        'z_loss': balance.router_z_loss(routing.logits),
        'seq_aux_loss': balance.sequence_balance_loss(
            routing.probs.reshape(batch, length, num_experts),
            routing.experts.reshape(batch, length, -1), num_experts),
    }
    coefs = {'aux_loss': moe.aux_loss_coef, 'z_loss': moe.z_loss_coef,
             'seq_aux_loss': moe.seq_aux_loss_coef}
    if self.is_mutable_collection(LOSSES):
      total = sum(coefs[k] * v for k, v in terms.items() if coefs[k])
      self.put_variable(LOSSES, 'moe', jnp.asarray(total, jnp.float32))
    if self.is_mutable_collection(STATS):
      for name, value in {**terms, 'load': load,
                          'dropped_fraction': dispatch_stats['dropped_fraction']}.items():
        self.put_variable(STATS, name, value)
