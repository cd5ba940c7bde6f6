"""Load balancing for the routers: auxiliary losses, expert load, the auxiliary-loss-free bias.

All are pure jnp on one layer's Routing fields; losses are float32 scalars without their
coefficients (the caller weighs them by model.moe.*_coef). Only the router probabilities carry
gradient: the assignment shares fᵢ are counts, constants to the optimiser (as in Switch).

load_balancing_loss vs transformers' Mixtral `load_balancing_loss_func` (5.23): HF divides
the assignment counts by the number of tokens T, not by the T·k assignments, so for one layer
HF's value is exactly k times this one (uniform routing gives k there, 1 here). Over several
layers HF also pools counts and probabilities across layers before multiplying (Σᵢ f̄ᵢ·P̄ᵢ),
whereas averaging this per-layer loss gives mean over layers of Σᵢ fᵢ·Pᵢ. To reproduce HF's
Mixtral training loss use coef_hf·k on one layer.
"""

import jax
import jax.numpy as jnp


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
  """experts [..., k] int -> [num_experts] int32: how many assignments each expert received."""
  return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


def load_balancing_loss(probs: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Switch/GShard's E·Σᵢ fᵢ·Pᵢ (Fedus et al. 2021 Eq. 4-6; DeepSeek-V2's expert-level loss).

  probs [T, E], experts [T, k]. fᵢ: share of the T·k assignments that go to expert i;
  Pᵢ: mean over tokens of probsᵢ. Perfect balance with uniform probabilities gives 1.
  """
  f = expert_load(experts, num_experts).astype(jnp.float32) / experts.size
  p = jnp.mean(probs.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE's z-loss (Zoph et al. 2022 Eq. 5): mean over tokens of logsumexp(logits)²."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))


def sequence_balance_loss(probs: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437 Eq. 17-20), mean over B.

  probs [B, S, E] (normalised affinities), experts [B, S, k]. Per sequence
  fᵢ = E/(k·S)·|{t: i in top-k of t}|, Pᵢ = mean over the S tokens of probsᵢ; loss Σᵢ fᵢ·Pᵢ.
  """
  b, s, k = experts.shape
  counts = jax.vmap(lambda e: expert_load(e, num_experts))(experts).astype(jnp.float32)
  f = counts * (num_experts / (k * s))                       # [B, E]
  p = jnp.mean(probs.astype(jnp.float32), axis=1)            # [B, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2, after Eq. 16; Wang et al. 2024):
  bᵢ += rate·sign(mean load − loadᵢ), raising the bias of under-loaded experts. [..., E] float32:
  leading axes (a scanned stack's layers) are independent."""
  load = load.astype(jnp.float32)
  return bias.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
