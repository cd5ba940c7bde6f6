"""Balance losses against direct loops over the papers' sums, and Mixtral's in transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from efficientjax.model import MoEConfig
from efficientjax.moe import (expert_load, load_balancing_loss, route, router_z_loss,
                              sequence_balance_loss, update_bias)


_route = jax.jit(route, static_argnums=1)


def _routing(t, e, k, seed, scale=1.5):
  logits = np.random.default_rng(seed).standard_normal((t, e)).astype(np.float32) * scale
  return logits, _route(jnp.asarray(logits), MoEConfig(num_experts=e, top_k=k))


def _loop_aux(probs, experts, e):
  t, k = experts.shape
  total = 0.0
  for i in range(e):
    f = sum(1 for tok in range(t) for j in range(k) if experts[tok, j] == i) / (t * k)
    p = sum(float(probs[tok, i]) for tok in range(t)) / t
    total += f * p
  return e * total


def test_expert_load_counts():
  experts = np.random.default_rng(0).integers(0, 7, (33, 3))
  load = expert_load(jnp.asarray(experts), 7)
  assert load.dtype == jnp.int32
  np.testing.assert_array_equal(load, np.bincount(experts.ravel(), minlength=7))


def test_load_balancing_loss_matches_loops():
  e, k = 6, 2
  _, r = _routing(40, e, k, seed=1)
  got = load_balancing_loss(r.probs, r.experts, e)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, _loop_aux(np.asarray(r.probs), np.asarray(r.experts), e),
                             rtol=1e-6)
  # Perfect balance with uniform probabilities: exactly 1.
  experts = jnp.arange(12).reshape(6, 2) % e
  np.testing.assert_allclose(load_balancing_loss(jnp.full((6, e), 1 / e), experts, e), 1.0,
                             rtol=1e-6)


def test_load_balancing_loss_is_k_over_mixtral_forward_and_backward():
  """transformers divides the counts by T, not T·k: its loss is k times ours, gradient too."""
  e, k, t = 8, 2, 48
  logits = np.random.default_rng(2).standard_normal((t, e)).astype(np.float32)
  hidden = torch.from_numpy(logits).requires_grad_(True)
  theirs = load_balancing_loss_func((hidden,), e, k)
  theirs.backward()

  def ours(l):
    r = route(l, MoEConfig(num_experts=e, top_k=k))
    return load_balancing_loss(r.probs, r.experts, e)

  value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(logits))
  np.testing.assert_allclose(k * value, theirs.item(), rtol=1e-6)
  np.testing.assert_allclose(k * grad, hidden.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_router_z_loss_matches_loops_and_torch_gradient():
  logits = np.random.default_rng(3).standard_normal((17, 5)).astype(np.float32) * 3
  want = np.mean([np.log(np.sum(np.exp(row.astype(np.float64)))) ** 2 for row in logits])
  value, grad = jax.jit(jax.value_and_grad(router_z_loss))(jnp.asarray(logits))
  np.testing.assert_allclose(value, want, rtol=1e-6)
  l = torch.from_numpy(logits).requires_grad_(True)
  torch.logsumexp(l, -1).square().mean().backward()
  np.testing.assert_allclose(grad, l.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_sequence_balance_loss_matches_loops():
  b, s, e, k = 3, 20, 8, 3
  logits = np.random.default_rng(4).standard_normal((b * s, e)).astype(np.float32)
  r = _route(jnp.asarray(logits), MoEConfig(num_experts=e, top_k=k, router='sigmoid'))
  probs, experts = np.asarray(r.probs).reshape(b, s, e), np.asarray(r.experts).reshape(b, s, k)
  want = 0.0
  for seq in range(b):  # DeepSeek-V3 Eq. 17-20, term by term
    for i in range(e):
      f = e / (k * s) * sum(1 for t in range(s) if i in experts[seq, t])
      p = sum(float(probs[seq, t, i]) for t in range(s)) / s
      want += f * p / b
  got = sequence_balance_loss(jnp.asarray(probs), jnp.asarray(experts), e)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # One sequence: the same as the batch-wise loss over its tokens.
  one_seq = sequence_balance_loss(jnp.asarray(probs[:1]), jnp.asarray(experts[:1]), e)
  batch_wise = load_balancing_loss(jnp.asarray(probs[0]), jnp.asarray(experts[0]), e)
  np.testing.assert_allclose(one_seq, batch_wise, rtol=1e-6)


def test_update_bias_by_hand():
  bias = jnp.array([0.1, 0.0, -0.2, 0.0])
  new = update_bias(bias, jnp.array([4, 0, 2, 2]), 0.01)  # mean load 2
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(new, [0.09, 0.01, -0.2, 0.0], rtol=1e-6)


def test_update_bias_balances_a_skewed_router():
  """Repeated updates on a router that prefers a few experts even out the load (V3 §2.1.2)."""
  e, k, t = 8, 2, 256
  cfg = MoEConfig(num_experts=e, top_k=k, router='sigmoid')
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.standard_normal((t, e)) + np.linspace(2, -2, e), jnp.float32)

  @jax.jit
  def step(bias, _):
    load = expert_load(route(logits, cfg, bias).experts, e)
    return update_bias(bias, load, 0.01), load

  bias, loads = jax.lax.scan(step, jnp.zeros(e, jnp.float32), None, length=300)
  first, last = np.asarray(loads[0]), np.asarray(loads[-20:]).mean(0)
  mean = t * k / e
  assert np.abs(first - mean).max() > 0.5 * mean            # it starts badly skewed ...
  assert np.abs(last - mean).max() < 0.25 * np.abs(first - mean).max()  # ... and evens out
  assert bias[0] < 0 < bias[-1]  # the favourite is pushed down, the neglected up
