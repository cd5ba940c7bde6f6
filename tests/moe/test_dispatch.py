"""Dispatch strategies: against a float64 loop over tokens, and against each other.

dense, capacity (with room for every token) and dropless with every grouped matmul that runs
on CPU ('triton' through Pallas' interpreter) must give the same outputs and the same
gradients with respect to x, every expert weight and the router logits (through the combine
weights). Capacity drops are checked against a hand count.
"""

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.errors import ConfigError
from efficientjax.model import MoEConfig
from efficientjax.moe import DISPATCH, Routing, expert_capacity, grouped_matmul, route

T, D, F = 24, 16, 32


def _weights(e, seed, d=D, f=F):
  rng = np.random.default_rng(seed)
  shapes = {'gate': (e, d, f), 'up': (e, d, f), 'down': (e, f, d)}
  return {n: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
          for n, s in shapes.items()}


def _loop(x, w, experts, weights, kept=None):
  """float64 y[t] = Σⱼ weights[t, j]·expert(x[t]) over the kept assignments."""
  x, experts, weights = np.asarray(x, np.float64), np.asarray(experts), np.asarray(weights)
  w = {n: np.asarray(a, np.float64) for n, a in w.items()}
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(experts.shape[1]):
      if kept is not None and not kept[t][j]:
        continue
      e = experts[t, j]
      g, u = x[t] @ w['gate'][e], x[t] @ w['up'][e]
      y[t] += weights[t, j] * ((g / (1 + np.exp(-g)) * u) @ w['down'][e])
  return y


def _close(got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max() + 1e-12
  assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


@functools.lru_cache(maxsize=None)
def _step(cfg: MoEConfig, dtype=jnp.float32):
  """jit(value_and_grad) of Σ y·probe through route + dispatch, for cfg's strategy."""
  def loss(x, w, logits, probe):
    routing = route(logits, cfg)
    y, stats = DISPATCH.get(cfg.dispatch)(x, w, routing, cfg, dtype=dtype, interpret=True)
    return jnp.sum(y.astype(jnp.float32) * probe), (y, stats, routing)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.lru_cache(maxsize=None)
def _fixed_step(cfg: MoEConfig):
  """Like _step with a hand-made routing: gradients w.r.t. x, the weights, the combine weights."""
  def loss(x, w, combine, experts, probe):
    unused = jnp.zeros((x.shape[0], cfg.num_experts))  # dispatch reads weights and experts only
    routing = Routing(weights=combine, experts=experts, probs=unused, logits=unused)
    y, stats = DISPATCH.get(cfg.dispatch)(x, w, routing, cfg, dtype=jnp.float32, interpret=True)
    return jnp.sum(y * probe), (y, stats)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


E, K = 6, 2
BASE = MoEConfig(num_experts=E, top_k=K, router='softmax')
DENSE = dataclasses.replace(BASE, dispatch='dense')
# capacity_factor E/k gives C = T: room for every assignment.
STRATEGIES = {
    'dense': dict(dispatch='dense'),
    'capacity_roomy': dict(dispatch='capacity', capacity_factor=E / K),
    'dropless_ragged_dot': dict(dispatch='dropless', grouped_matmul='ragged_dot'),
    'dropless_reference': dict(dispatch='dropless', grouped_matmul='reference'),
    'dropless_triton_interpret': dict(dispatch='dropless', grouped_matmul='triton'),
}


def _inputs(seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((T, D)), jnp.float32), _weights(E, seed + 1),
          jnp.asarray(rng.standard_normal((T, E)), jnp.float32),
          jnp.asarray(rng.standard_normal((T, D)), jnp.float32))


def test_registry_names():
  assert list(DISPATCH) == ['capacity', 'dense', 'dropless']


@pytest.mark.parametrize('name', list(STRATEGIES))
def test_strategies_agree_outputs_and_gradients(name):
  x, w, logits, probe = _inputs(seed=7)
  cfg = dataclasses.replace(BASE, **STRATEGIES[name])
  (_, (y, stats, routing)), grads = _step(cfg)(x, w, logits, probe)
  assert y.dtype == jnp.float32 and y.shape == (T, D)
  assert stats['dropped_fraction'].dtype == jnp.float32
  assert float(stats['dropped_fraction']) == 0.0
  _close(y, _loop(x, w, routing.experts, routing.weights), 2e-6)

  (_, (y_dense, _, _)), grads_dense = _step(DENSE)(x, w, logits, probe)
  _close(y, y_dense, 2e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_dense)):
    _close(got, want, 2e-5)
  assert np.abs(np.asarray(grads[2])).max() > 0  # the logits do get gradient via the weights


def test_capacity_drops_the_hand_counted_assignments():
  # E=3, k=2, T=6, capacity_factor 0.5: C = ceil(0.5·6·2/3) = 2 slots per expert.
  cfg = MoEConfig(num_experts=3, top_k=2, dispatch='capacity', capacity_factor=0.5)
  assert expert_capacity(6, 2, 3, 0.5) == 2
  experts = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [0, 2]], np.int32)
  # First choices in token order: expert 0 gets t0, t1 (t2, t5 dropped); 1 gets t3; 2 gets t4.
  # Second choices after all first ones: t0→1 (2nd slot of 1) and t1→2 (2nd slot of 2) fit;
  # t2→1, t3→0, t4→0, t5→2 find their experts full.
  kept = [[1, 1], [1, 1], [0, 0], [1, 0], [1, 0], [0, 0]]
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
  w = _weights(3, 12)
  combine = jnp.asarray(rng.uniform(0.2, 1.0, (6, 2)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
  (_, (y, stats)), (dx, _, dcombine) = _fixed_step(cfg)(x, w, combine, jnp.asarray(experts), probe)
  np.testing.assert_allclose(stats['dropped_fraction'], 0.5)
  _close(y, _loop(x, w, experts, combine, kept), 2e-6)
  assert not np.any(np.asarray(y)[[2, 5]]) and not np.any(np.asarray(dx)[[2, 5]])
  np.testing.assert_array_equal(np.asarray(dcombine) != 0, np.asarray(kept, bool))


def test_expert_capacity_rounding():
  assert expert_capacity(10, 2, 4, 1.25) == 7      # ceil(6.25)
  assert expert_capacity(30, 1, 3, 0.1) == 1       # 0.1·30/3 is 1.0000000000000002 in floats
  assert expert_capacity(8, 2, 2, 4.0) == 8        # never more slots than tokens
  assert expert_capacity(100, 1, 64, 0.01) == 1    # never fewer than one
  with pytest.raises(ConfigError, match='capacity_factor'):
    expert_capacity(8, 2, 2, 0.0)


def _fixed_case(experts, e, seed):
  rng = np.random.default_rng(seed)
  t, k = experts.shape
  return (jnp.asarray(rng.standard_normal((t, D)), jnp.float32), _weights(e, seed + 1),
          jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32), jnp.asarray(experts),
          jnp.asarray(rng.standard_normal((t, D)), jnp.float32))


FIXED = ['dense', 'capacity_roomy', 'dropless_ragged_dot']


def test_empty_experts_get_no_tokens_and_no_gradient():
  e, k = 6, 2
  rng = np.random.default_rng(3)
  used = np.array([0, 2, 5])
  experts = np.stack([rng.permutation(used)[:k] for _ in range(T)]).astype(np.int32)
  args = _fixed_case(experts, e, seed=4)
  results = []
  for name in FIXED:
    cfg = MoEConfig(num_experts=e, top_k=k, **STRATEGIES[name])
    results.append(_fixed_step(cfg)(*args))
  (_, (y0, _)), g0 = results[0]
  _close(y0, _loop(args[0], args[1], experts, args[2]), 2e-6)
  for (_, (y, _)), g in results:
    _close(y, y0, 2e-6)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      _close(got, want, 2e-5)
    for name, grad in g[1].items():
      assert not np.any(np.asarray(grad)[[1, 3, 4]]), name  # unused experts: exactly zero


def test_all_tokens_to_one_expert():
  e, k = 4, 1
  experts = np.full((T, k), 2, np.int32)
  x, w, combine, experts_j, _ = _fixed_case(experts, e, seed=5)
  routing = Routing(weights=combine, experts=experts_j, probs=jnp.zeros((T, e)),
                    logits=jnp.zeros((T, e)))
  want = _loop(x, w, experts, combine)

  def run(**kw):
    cfg = MoEConfig(num_experts=e, top_k=k, **kw)
    return jax.jit(functools.partial(DISPATCH.get(cfg.dispatch), cfg=cfg, dtype=jnp.float32))(
        x, w, routing)

  for kw in (dict(dispatch='dropless', grouped_matmul='ragged_dot'),
             dict(dispatch='capacity', capacity_factor=4.0)):  # C = 24: room for all
    y, stats = run(**kw)
    _close(y, want, 2e-6)
    assert float(stats['dropped_fraction']) == 0.0, kw
  # capacity_factor 1: C = ceil(24·1/4) = 6 slots; the first 6 tokens pass, 18 are dropped.
  y, stats = run(dispatch='capacity', capacity_factor=1.0)
  np.testing.assert_allclose(stats['dropped_fraction'], 18 / 24)
  _close(y[:6], want[:6], 2e-6)
  assert not np.any(np.asarray(y)[6:])


@pytest.mark.parametrize('name', FIXED)
def test_bfloat16_compute(name):
  x, w, logits, _ = _inputs(seed=9)
  cfg = dataclasses.replace(BASE, **STRATEGIES[name])
  routing = route(logits, cfg)
  fn = jax.jit(functools.partial(DISPATCH.get(cfg.dispatch), cfg=cfg, dtype=jnp.bfloat16))
  y, _ = fn(x, w, routing)
  assert y.dtype == jnp.bfloat16
  _close(y, _loop(x, w, routing.experts, routing.weights), 3e-2)


def test_grouped_matmul_choices():
  rng = np.random.default_rng(13)
  lhs = jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((3, 8, 5)), jnp.float32)
  sizes = jnp.array([4, 0, 6], jnp.int32)
  want = np.concatenate([np.asarray(lhs[:4]) @ np.asarray(rhs[0]),
                         np.asarray(lhs[4:]) @ np.asarray(rhs[2])])
  # 'triton' (interpreted) runs in test_strategies_agree_outputs_and_gradients, 'mosaic_gpu'
  # in test_dropless_mosaic_gpu_in_bfloat16; 'autotune' off a GPU is 'auto'.
  for impl in ('auto', 'autotune', 'ragged_dot', 'reference'):
    out = grouped_matmul(lhs, rhs, sizes, impl, preferred_element_type=jnp.float32)
    _close(out, want, 2e-6)
  if importlib.util.find_spec('tokamax') is None:
    with pytest.raises(ConfigError, match='pip install tokamax'):
      grouped_matmul(lhs, rhs, sizes, 'tokamax')
  else:
    _close(grouped_matmul(lhs, rhs, sizes, 'tokamax'), want, 2e-6)
  with pytest.raises(ConfigError, match='model.moe.grouped_matmul'):
    grouped_matmul(lhs, rhs, sizes, 'cublas')


def test_dropless_mosaic_gpu_in_bfloat16():
  """The Hopper kernels (jax's GPU interpreter) inside the dropless dispatch: outputs and all
  gradients equal the plain-jnp grouped matmul's, both in bf16 (wgmma takes 16-bit operands)."""
  from tests.kernels.mosaic_interpret import interpretable  # pylint: disable=g-import-not-at-top
  x, w, logits, probe = _inputs(seed=17)
  results = []
  with interpretable():
    for gmm in ('mosaic_gpu', 'reference'):
      cfg = dataclasses.replace(BASE, dispatch='dropless', grouped_matmul=gmm)
      (_, (y, _, _)), grads = _step(cfg, jnp.bfloat16)(x, w, logits, probe)
      results.append((y, grads))
  (y, grads), (y_ref, grads_ref) = results
  assert y.dtype == jnp.bfloat16
  _close(y, y_ref, 1e-2)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _close(got, want, 1e-2)
