"""Routers: hand-worked examples, and transformers' own Mixtral / DeepSeek-V2 / V3 routers.

The transformers routers compute logits = hidden @ weightᵀ; with weight = I (E x E) and
hidden = our logits they route exactly our logits, and torch autograd through them gives the
gradient of the combine weights with respect to the logits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from efficientjax.errors import ConfigError
from efficientjax.model import MoEConfig
from efficientjax.moe import ROUTERS, route

TOL = 1e-6  # float32, the same formulas: rounding only


def _logit(p):
  """Logits whose softmax is p (p sums to 1)."""
  return jnp.log(jnp.asarray(p, jnp.float32))


def _inv_sigmoid(s):
  s = np.asarray(s, np.float64)
  return jnp.asarray(np.log(s / (1 - s)), jnp.float32)


def _route(logits, bias=None, **kw):
  cfg = MoEConfig(**kw)
  return jax.jit(lambda l, b: route(l, cfg, b))(logits, bias)


def test_registry_names():
  assert list(ROUTERS) == ['sigmoid', 'softmax']


# --- softmax, by hand --------------------------------------------------------------------------

def test_softmax_topk_renormalise_and_scale():
  logits = _logit([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.1, 0.4]])
  r = _route(logits, num_experts=4, top_k=2, norm_topk_prob=True)
  np.testing.assert_array_equal(r.experts, [[3, 2], [0, 3]])  # the tie 0.4/0.4: lowest first
  np.testing.assert_allclose(r.weights, [[4 / 7, 3 / 7], [0.5, 0.5]], rtol=TOL)
  np.testing.assert_allclose(r.probs, [[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.1, 0.4]], rtol=TOL)
  np.testing.assert_array_equal(r.logits, logits)
  assert r.weights.dtype == r.probs.dtype == jnp.float32 and r.experts.dtype == jnp.int32

  r = _route(logits, num_experts=4, top_k=2, norm_topk_prob=False, routed_scaling_factor=2.5)
  np.testing.assert_allclose(r.weights, [[1.0, 0.75], [1.0, 1.0]], rtol=TOL)
  r = _route(logits, num_experts=4, top_k=2, norm_topk_prob=True, routed_scaling_factor=2.5)
  np.testing.assert_allclose(r.weights, [[2.5 * 4 / 7, 2.5 * 3 / 7], [1.25, 1.25]], rtol=TOL)


def test_softmax_ties_go_to_the_lowest_index():
  r = _route(jnp.zeros((1, 6)), num_experts=6, top_k=3)
  np.testing.assert_array_equal(r.experts, [[0, 1, 2]])
  np.testing.assert_allclose(r.weights, [[1 / 3] * 3], rtol=TOL)


def test_softmax_group_limited_masks_by_group_max():
  # Groups {0,1} {2,3} {4,5}; group scores (max p): 0.26, 0.25, 0.24.
  p = [[0.26, 0.02, 0.25, 0.01, 0.24, 0.22]]
  free = _route(_logit(p), num_experts=6, top_k=3)
  np.testing.assert_array_equal(free.experts, [[0, 2, 4]])
  limited = _route(_logit(p), num_experts=6, top_k=3, num_groups=3, topk_groups=2)
  np.testing.assert_array_equal(limited.experts, [[0, 2, 1]])  # group {4,5} is out
  np.testing.assert_allclose(limited.weights, [[0.26 / 0.53, 0.25 / 0.53, 0.02 / 0.53]],
                             rtol=1e-5)
  one = _route(_logit(p), num_experts=6, top_k=2, num_groups=3, topk_groups=1)
  np.testing.assert_array_equal(one.experts, [[0, 1]])
  np.testing.assert_allclose(one.probs, p, rtol=1e-5)  # the losses see the unmasked probs


# --- sigmoid, by hand --------------------------------------------------------------------------

def test_sigmoid_bias_changes_selection_not_weights():
  s = [[0.5, 0.6, 0.7, 0.4]]
  kw = dict(num_experts=4, top_k=2, router='sigmoid', norm_topk_prob=True)
  r = _route(_inv_sigmoid(s), **kw)
  np.testing.assert_array_equal(r.experts, [[2, 1]])
  np.testing.assert_allclose(r.weights, [[0.7 / 1.3, 0.6 / 1.3]], rtol=1e-5)
  np.testing.assert_allclose(r.probs, [[0.5 / 2.2, 0.6 / 2.2, 0.7 / 2.2, 0.4 / 2.2]], rtol=1e-5)

  biased = _route(_inv_sigmoid(s), jnp.array([0.3, 0.0, 0.0, 0.0]), **kw)
  np.testing.assert_array_equal(biased.experts, [[0, 2]])  # 0.5 + 0.3 beats 0.7
  np.testing.assert_allclose(biased.weights, [[0.5 / 1.2, 0.7 / 1.2]], rtol=1e-5)
  np.testing.assert_allclose(biased.probs, r.probs, rtol=TOL)  # bias never reaches the losses

  unnormed = _route(_inv_sigmoid(s), jnp.array([0.3, 0.0, 0.0, 0.0]),
                    **{**kw, 'norm_topk_prob': False, 'routed_scaling_factor': 2.0})
  np.testing.assert_allclose(unnormed.weights, [[1.0, 1.4]], rtol=1e-5)


def test_sigmoid_group_limited_scores_groups_by_top2_sum():
  # Groups {0,1} {2,3} {4,5}; top-2 sums 1.0, 1.15, 1.35: expert 0, the best single
  # expert, is out, where the softmax rule (group max) would keep its group.
  s = [[0.9, 0.1, 0.6, 0.55, 0.7, 0.65]]
  kw = dict(num_experts=6, top_k=2, router='sigmoid', num_groups=3, topk_groups=2,
            routed_scaling_factor=3.0)
  r = _route(_inv_sigmoid(s), **kw)
  np.testing.assert_array_equal(r.experts, [[4, 5]])
  np.testing.assert_allclose(r.weights, [[3 * 0.7 / 1.35, 3 * 0.65 / 1.35]], rtol=1e-5)
  # The bias takes part in the group scores too: +0.5 on expert 1 lifts group {0,1} to 1.5,
  # past {2,3}; then 0.9 (expert 0) and 0.7 (expert 4) beat expert 1's biased 0.6.
  biased = _route(_inv_sigmoid(s), jnp.array([0, 0.5, 0, 0, 0, 0.]), **kw)
  np.testing.assert_array_equal(biased.experts, [[0, 4]])
  np.testing.assert_allclose(biased.weights, [[3 * 0.9 / 1.6, 3 * 0.7 / 1.6]], rtol=1e-5)


def test_bad_group_configs_are_config_errors():
  logits = jnp.zeros((2, 8))
  for kw, field in [(dict(num_groups=3), 'model.moe.num_groups'),
                    (dict(num_groups=4, topk_groups=5), 'model.moe.topk_groups'),
                    (dict(num_groups=4, topk_groups=1, top_k=3), 'model.moe.topk_groups'),
                    (dict(top_k=9), 'model.moe.top_k'),
                    (dict(router='tanh'), 'model.moe.router')]:
    with pytest.raises(ConfigError) as e:
      route(logits, MoEConfig(num_experts=8, **{'top_k': 2, **kw}))
    assert e.value.field == field
  with pytest.raises(ValueError, match='experts'):
    route(jnp.zeros((2, 6)), MoEConfig(num_experts=8))


# --- against transformers ----------------------------------------------------------------------

def _hf_router(kind: str, e: int, k: int, **kw):
  common = dict(hidden_size=e, num_attention_heads=1, num_experts_per_tok=k)
  if kind == 'mixtral':
    module = MixtralTopKRouter(transformers.MixtralConfig(num_local_experts=e, **common))
  elif kind == 'v2':
    module = DeepseekV2TopkRouter(transformers.DeepseekV2Config(n_routed_experts=e, **common, **kw))
  else:
    module = DeepseekV3TopkRouter(transformers.DeepseekV3Config(n_routed_experts=e, **common, **kw))
  with torch.no_grad():
    module.weight.copy_(torch.eye(e))
  return module


# (transformers router, its config, our MoEConfig, bias?)
HF_CASES = {
    'mixtral': ('mixtral', {}, dict(num_experts=8, top_k=2), False),
    'mixtral_top1': ('mixtral', {}, dict(num_experts=8, top_k=1), False),
    'v2_greedy': ('v2', dict(topk_method='greedy', routed_scaling_factor=16.0),
                  dict(num_experts=16, top_k=6, norm_topk_prob=False, routed_scaling_factor=16.0),
                  False),
    'v2_group_limited': ('v2', dict(topk_method='group_limited_greedy', n_group=4, topk_group=2,
                                    routed_scaling_factor=1.5),
                         dict(num_experts=16, top_k=3, norm_topk_prob=False,
                              routed_scaling_factor=1.5, num_groups=4, topk_groups=2), False),
    'v3_grouped_biased': ('v3', dict(n_group=4, topk_group=2, norm_topk_prob=True,
                                     routed_scaling_factor=2.5),
                          dict(num_experts=16, top_k=4, router='sigmoid', num_groups=4,
                               topk_groups=2, routed_scaling_factor=2.5), True),
    'v3_one_group_unnormed': ('v3', dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                         routed_scaling_factor=1.0),
                              dict(num_experts=8, top_k=2, router='sigmoid',
                                   norm_topk_prob=False), True),
}


@pytest.mark.parametrize('case', list(HF_CASES))
def test_matches_transformers_forward_and_backward(case):
  kind, hf_kw, our_kw, with_bias = HF_CASES[case]
  cfg = MoEConfig(**our_kw)
  e, k, t = cfg.num_experts, cfg.top_k, 64
  rng = np.random.default_rng(sum(map(ord, case)))
  logits = rng.standard_normal((t, e)).astype(np.float32) * 2
  bias = (rng.standard_normal(e) * 0.3).astype(np.float32) if with_bias else None
  probe = rng.standard_normal((t, e)).astype(np.float32)  # a cotangent per (token, expert)

  hf = _hf_router(kind, e, k, **hf_kw)
  if bias is not None:
    hf.e_score_correction_bias.copy_(torch.from_numpy(bias))
  hidden = torch.from_numpy(logits).requires_grad_(True)
  _, hf_weights, hf_experts = hf(hidden)
  (torch.from_numpy(probe).gather(1, hf_experts) * hf_weights).sum().backward()

  def loss(l):
    r = route(l, cfg, None if bias is None else jnp.asarray(bias))
    return jnp.sum(jnp.take_along_axis(jnp.asarray(probe), r.experts, 1) * r.weights), r

  (_, r), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(logits))

  # transformers' top-k is unsorted: compare each token's (expert, weight) pairs by expert.
  hf_experts, hf_weights = hf_experts.numpy(), hf_weights.detach().numpy()
  ours, theirs = np.argsort(r.experts, 1), np.argsort(hf_experts, 1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(r.experts), ours, 1),
                                np.take_along_axis(hf_experts, theirs, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), ours, 1),
                             np.take_along_axis(hf_weights, theirs, 1), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(grad, hidden.grad.numpy(), rtol=1e-5, atol=1e-6)
  if kind == 'v3':
    # The group limit must actually bind somewhere for the case to test it.
    unlimited = route(jnp.asarray(logits), dataclasses.replace(cfg, num_groups=1),
                      jnp.asarray(bias))
    assert cfg.num_groups == 1 or np.any(np.sort(unlimited.experts, 1) != np.sort(r.experts, 1))


# --- sigmoid against a plain numpy formula -----------------------------------------------------

def _numpy_sigmoid_route(logits: np.ndarray, bias: np.ndarray, cfg: MoEConfig):
  """DeepSeek-V3's routing as transformers' DeepseekV3TopkRouter computes it, token by token in
  float64: choice c = sigmoid(l) + bias; a group's score is the sum of its two best c; the
  topk_groups best groups kept, the others' c set to -inf; the top_k best c picked; weights the
  unbiased sigmoids, over their sum + 1e-20 if norm_topk_prob, times routed_scaling_factor."""
  per = cfg.num_experts // cfg.num_groups
  experts, weights = [], []
  for row in logits.astype(np.float64):
    s = 1.0 / (1.0 + np.exp(-row))
    c = (s + bias).reshape(cfg.num_groups, per)
    group = np.sort(c, axis=1)[:, -2:].sum(axis=1)
    masked = np.full_like(c, -np.inf)
    kept = np.argsort(-group, kind='stable')[:cfg.topk_groups]
    masked[kept] = c[kept]
    top = np.argsort(-masked.reshape(-1), kind='stable')[:cfg.top_k]
    w = s[top] / (s[top].sum() + 1e-20) if cfg.norm_topk_prob else s[top]
    experts.append(top)
    weights.append(w * cfg.routed_scaling_factor)
  return np.array(experts), np.array(weights)


@pytest.mark.parametrize('kw', [
    dict(num_experts=16, top_k=4, num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    dict(num_experts=12, top_k=3, num_groups=1, topk_groups=1, norm_topk_prob=False),
    # Two groups of two, one kept, top-2: every kept expert is picked, however low its score.
    dict(num_experts=4, top_k=2, num_groups=2, topk_groups=1, routed_scaling_factor=1.5),
])
def test_sigmoid_matches_numpy_formula(kw):
  cfg = MoEConfig(router='sigmoid', **kw)
  rng = np.random.default_rng(cfg.num_experts)
  logits = rng.standard_normal((64, cfg.num_experts)).astype(np.float32)
  # Biases below -1 make some choice scores negative: masked experts are -inf, not 0 (DeepSeek's
  # own MoEGate fills 0.0, which would then pick experts of the groups left out).
  bias = (rng.standard_normal(cfg.num_experts) * 0.6 - 0.4).astype(np.float32)
  assert (1 / (1 + np.exp(-logits)) + bias < 0).any()
  r = _route(jnp.asarray(logits), jnp.asarray(bias), router='sigmoid', **kw)
  want_experts, want_weights = _numpy_sigmoid_route(logits, bias.astype(np.float64), cfg)
  ours, theirs = np.argsort(r.experts, 1), np.argsort(want_experts, 1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(r.experts), ours, 1),
                                np.take_along_axis(want_experts, theirs, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), ours, 1),
                             np.take_along_axis(want_weights, theirs, 1), rtol=1e-5, atol=1e-7)


def test_sigmoid_masks_left_out_groups_below_negative_scores():
  # Choice scores ~ -0.4, -0.4 | -1, -1: group {0,1} is kept, and its negative scores still beat
  # the left-out group's (a 0.0 fill would pick experts 2 and 3).
  logits = jnp.zeros((1, 4))
  r = _route(logits, jnp.array([-0.9, -0.9, -1.5, -1.5]), num_experts=4, top_k=2,
             router='sigmoid', num_groups=2, topk_groups=1)
  np.testing.assert_array_equal(np.sort(r.experts, 1), [[0, 1]])
  np.testing.assert_allclose(r.weights, [[0.5, 0.5]], rtol=1e-6)  # s = 1/2 each, renormalised
