"""Routers: router logits -> each token's top-k experts and their combine weights.

A router is a pure function `(logits [T, E] float32, cfg: MoEConfig, bias [E] | None) ->
Routing`, registered in ROUTERS under its `model.moe.router` name. Both follow transformers
(5.23) so that Hugging Face checkpoints route identically:

  softmax  Mixtral (MixtralTopKRouter) and DeepSeek-V2 (DeepseekV2TopkRouter): probabilities
           p = softmax(logits) in fp32, top-k of p; group-limited ('group_limited_greedy')
           scores a group by its largest p.
  sigmoid  DeepSeek-V3 (DeepseekV3TopkRouter, arXiv 2412.19437 §2.1.2): affinities
           s = sigmoid(logits) in fp32; experts are chosen on s + bias (the auxiliary-loss-free
           balancing bias, Eq. 16) but weighted by s alone; group-limited scores a group by the
           sum of its two largest s + bias.

Weights: the chosen scores, divided by their sum (+1e-20, V3's epsilon) when norm_topk_prob,
then multiplied by routed_scaling_factor. Ties in the top-k go to the lowest expert index
(jax.lax.top_k); experts come out in descending order of selection score.

Deliberate differences from transformers, none of which changes a released checkpoint:
  - Experts outside the kept groups are masked with -inf before the top-k for both routers;
    DeepseekV2TopkRouter fills them with 0.0, which only differs when fewer than top_k kept
    experts have a probability above exactly 0 (fp32 underflow).
  - DeepseekV2TopkRouter ignores norm_topk_prob (it always scales, never renormalises);
    the released V2 / V2-Lite configs set norm_topk_prob=False, where the two agree.
    MixtralTopKRouter always renormalises, with no epsilon and no scaling: Mixtral is
    norm_topk_prob=True, routed_scaling_factor=1 here.
  - transformers computes Mixtral's logits in the model dtype and DeepSeek's from fp32-cast
    hidden states and weights; the caller produces `logits`, so that choice is the caller's.
  - A softmax router also accepts `bias` (selection only, as for sigmoid), so auxiliary-loss-
    free balancing can be studied with either router; with bias None it is exactly HF's rule.
"""

import flax.struct
import jax
import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.registry import Registry

ROUTERS = Registry('model.moe.router')
NORM_EPS = 1e-20  # DeepseekV3TopkRouter's denominator epsilon for norm_topk_prob


@flax.struct.dataclass
class Routing:
  """One layer's routing decision for T tokens over E experts, top_k each.

  weights [T, k] float32: the combine weights of the chosen experts (renormalised and scaled);
  experts [T, k] int32: the chosen experts, distinct within a token;
  probs [T, E] float32: the per-token scores the balance losses use (softmax probabilities, or
    sigmoid affinities normalised to sum 1 per token, DeepSeek-V3 Eq. 19);
  logits [T, E] float32: the router logits (the z-loss uses them).
  """
  weights: jax.Array
  experts: jax.Array
  probs: jax.Array
  logits: jax.Array


def check(cfg) -> None:
  """Raises ConfigError when cfg's top_k / num_groups / topk_groups cannot route."""
  e = cfg.num_experts
  if not 1 <= cfg.top_k <= e:
    raise ConfigError('model.moe.top_k', f'must be in [1, num_experts={e}], got {cfg.top_k}')
  if cfg.num_groups < 1 or e % cfg.num_groups:
    raise ConfigError('model.moe.num_groups',
                      f'must divide num_experts={e} evenly, got {cfg.num_groups}')
  if cfg.num_groups > 1:
    if not 1 <= cfg.topk_groups <= cfg.num_groups:
      raise ConfigError('model.moe.topk_groups',
                        f'must be in [1, num_groups={cfg.num_groups}], got {cfg.topk_groups}')
    per_group = e // cfg.num_groups
    if cfg.topk_groups * per_group < cfg.top_k:
      enough = -(-cfg.top_k // per_group)
      raise ConfigError('model.moe.topk_groups',
                        f'{cfg.topk_groups} groups of {per_group} experts hold fewer '
                        f'than top_k={cfg.top_k}; raise topk_groups (to {enough})',
                        {'model.moe.topk_groups': enough})


def route(logits: jax.Array, cfg, bias: jax.Array | None = None) -> Routing:
  """logits [T, E] -> Routing, by the router cfg.router names (cfg: MoEConfig)."""
  if logits.ndim != 2:
    raise ValueError(f'route: want logits [tokens, experts], got shape {logits.shape}')
  if logits.shape[-1] != cfg.num_experts:
    raise ValueError(f'route: logits have {logits.shape[-1]} experts, model.moe.num_experts is '
                     f'{cfg.num_experts}')
  check(cfg)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    bias = jnp.asarray(bias, jnp.float32)
  return ROUTERS.get(cfg.router)(logits, cfg, bias)


def _group_mask(choice: jax.Array, cfg, group_score) -> jax.Array:
  """Sets the experts of all but the topk_groups best groups to -inf in choice [T, E]."""
  if cfg.num_groups <= 1:
    return choice
  t, e = choice.shape
  grouped = choice.reshape(t, cfg.num_groups, e // cfg.num_groups)
  _, keep = jax.lax.top_k(group_score(grouped), cfg.topk_groups)  # [T, topk_groups]
  kept = jnp.zeros((t, cfg.num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
  return jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(t, e)


def _combine_weights(scores: jax.Array, experts: jax.Array, cfg) -> jax.Array:
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + NORM_EPS)
  return weights * cfg.routed_scaling_factor


@ROUTERS.register('softmax')
def softmax_router(logits: jax.Array, cfg, bias: jax.Array | None = None) -> Routing:
  """Mixtral / DeepSeek-V2: top-k of softmax probabilities (group score: the group's max)."""
  probs = jax.nn.softmax(logits, axis=-1)
  choice = probs if bias is None else probs + bias
  choice = _group_mask(choice, cfg, lambda g: jnp.max(g, axis=-1))
  _, experts = jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.top_k)
  return Routing(weights=_combine_weights(probs, experts, cfg), experts=experts.astype(jnp.int32),
                 probs=probs, logits=logits)


@ROUTERS.register('sigmoid')
def sigmoid_router(logits: jax.Array, cfg, bias: jax.Array | None = None) -> Routing:
  """DeepSeek-V3: top-k of sigmoid(logits) + bias, weighted by the sigmoid alone.

  A group's score is the sum of its two best biased affinities (V3's rule; one when a group
  holds a single expert).
  """
  scores = jax.nn.sigmoid(logits)
  choice = scores if bias is None else scores + bias

  def top2_sum(grouped):
    return jnp.sum(jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0], axis=-1)

  choice = _group_mask(choice, cfg, top2_sum)
  _, experts = jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.top_k)
  # The balance losses see the affinities as a distribution over experts (V3 Eq. 19).
  probs = scores / (jnp.sum(scores, axis=-1, keepdims=True) + NORM_EPS)
  return Routing(weights=_combine_weights(scores, experts, cfg), experts=experts.astype(jnp.int32),
                 probs=probs, logits=logits)
