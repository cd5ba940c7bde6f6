"""The MoE block inside the model and the training step: strategies agree through the whole
network, the first-dense-layers layout, decoding, the balancing losses in the loss, and
auxiliary-loss-free balancing over steps (and through a checkpoint)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientjax import parallel
from efficientjax.model import ModelConfig, MoEConfig, Transformer, scan_params, unscan_params
from efficientjax.moe import balance
from efficientjax.moe.report import ExpertStats
from efficientjax.train.checkpoint import Checkpointer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import forward, make_train_step
from tests.helpers import jitted_forward, jitted_init, prefill_then_decode

TINY = ModelConfig(vocab_size=53, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, attention='gqa', ffn='moe',
                   moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16, num_shared_experts=1,
                                 first_dense_layers=1, aux_loss_coef=0.01, z_loss_coef=1e-3,
                                 seq_aux_loss_coef=1e-3),
                   init_std=0.2)  # large enough that the routing is far from ties


def _with(cfg, **moe):
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


def _init(cfg, seed=0, batch=2, length=12):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
  params = nn.unbox(jitted_init(cfg)(jax.random.key(seed), tokens)['params'])
  return model, params, tokens


def test_first_dense_layers_are_their_own_stack():
  _, params, _ = _init(TINY)
  assert set(params['dense_blocks']['mlp']) == {'gate', 'up', 'down'}  # a dense SwiGLU
  assert set(params['blocks']['mlp']) == {'router', 'gate', 'up', 'down', 'shared'}
  assert params['dense_blocks']['mlp']['gate']['kernel'].shape == (1, 32, 48)
  assert params['blocks']['mlp']['gate'].shape == (2, 4, 32, 16)  # [layers, experts, embed, f]
  assert params['blocks']['mlp']['shared']['gate']['kernel'].shape == (2, 32, 16)


def test_scanned_equals_unscanned():
  _, params, tokens = _init(TINY, seed=1)
  flat = unscan_params(params, TINY)
  assert sorted(k for k in flat if k.startswith('block_')) == ['block_0', 'block_1', 'block_2']
  unscanned = Transformer(dataclasses.replace(TINY, scan_layers=False))
  np.testing.assert_allclose(jitted_forward(TINY)({'params': params}, tokens),
                             jax.jit(unscanned.apply)({'params': flat}, tokens),
                             atol=1e-5, rtol=1e-5)
  back = scan_params(flat, TINY)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@functools.cache
def _loss_and_grads(cfg):
  """The training loss (balancing losses included) and its gradients, on seed 2's model."""
  _, params, tokens = _init(TINY, seed=2)
  batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)

  def f(p):
    losses, reported = forward(Transformer(cfg), p, {}, batch)
    return losses.mean() + sum(jnp.sum(x) for x in jax.tree.leaves(reported['losses']))
  return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_strategies_agree_through_the_model(dispatch):
  """`capacity` with room for every token and `dropless` compute the `dense` reference's
  function: the same logits and the same gradients for every parameter."""
  # The dense reference is computed once for both strategies (cached).
  want_loss, want_grads = _loss_and_grads(_with(TINY, dispatch='dense'))
  got_loss, got_grads = _loss_and_grads(_with(TINY, dispatch=dispatch, capacity_factor=4.0))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               got_grads, want_grads)


def test_balancing_losses_enter_the_training_loss():
  model, params, tokens = _init(TINY, seed=3)
  batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
  ce, reported = jax.jit(lambda p: forward(model, p, {}, batch))(params)
  stats = reported['moe_stats']['blocks']['mlp']
  assert stats['load'].shape == (2, 4)  # two MoE layers, four experts
  np.testing.assert_array_equal(stats['load'].sum(-1), [2 * 12 * 2] * 2)  # tokens x top-k
  moe = TINY.moe
  want = (moe.aux_loss_coef * stats['aux_loss'] + moe.z_loss_coef * stats['z_loss']
          + moe.seq_aux_loss_coef * stats['seq_aux_loss'])
  np.testing.assert_allclose(reported['losses']['blocks']['mlp']['moe'], want, rtol=1e-6)
  # Evaluation and inference ask for nothing and get the same logits.
  logits = jitted_forward(TINY)({'params': params}, tokens)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
  np.testing.assert_allclose(ce, losses, rtol=1e-6)


def test_prefill_then_decode_equals_forward():
  cfg = _with(TINY, dispatch='dropless')  # per-token routing: no batch-dependent drops
  _, params, tokens = _init(cfg, seed=4)
  want = jitted_forward(cfg)({'params': params}, tokens)
  np.testing.assert_allclose(prefill_then_decode(cfg, params, tokens, 5), want,
                             atol=2e-5, rtol=2e-5)


def _aux_free_run(cfg, steps, skew):
  """`steps` optimizer steps with frozen weights (SGD at rate 0), so only the routing bias
  moves; the bias starts skewed toward expert 0. Returns (max/mean load per step, state)."""
  model = Transformer(cfg)
  tx = optax.sgd(0.0)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1, 'expert': 1}, jax.devices()[:1])
  _, shardings = state_shardings(model, tx, mesh, 16)
  state = init_state(model, tx, mesh, 16, 0, shardings)
  bias = state.model_state['moe_state']['blocks']['mlp']['bias']
  state = state.replace(model_state={'moe_state': {'blocks': {'mlp': {
      'bias': bias.at[:, 0].set(skew)}}}})
  step = jax.jit(make_train_step(model, tx, 1))
  stats = ExpertStats(cfg)
  imbalance = []
  for i in range(steps):
    batch = jax.random.randint(jax.random.key(100 + i), (8, 17), 0, cfg.vocab_size)
    state, metrics = step(state, batch)
    imbalance.append(stats.add(jax.device_get(metrics['moe_stats']))['max_over_mean_load'])
  return imbalance, state, stats


def test_aux_loss_free_bias_evens_out_a_skewed_router(tmp_path):
  cfg = _with(TINY, router='sigmoid', aux_free=True, aux_loss_coef=0.0, z_loss_coef=0.0,
              seq_aux_loss_coef=0.0, num_shared_experts=0, bias_update_rate=0.05)
  imbalance, state, stats = _aux_free_run(cfg, steps=60, skew=3.0)
  # Expert 0 is in every token's top-2 at first: max/mean load = E / k = 2.
  assert imbalance[0] == pytest.approx(2.0)
  # The bias walks expert 0 down and the others up (0.05 per step) until the loads even out,
  # then hovers: sign updates keep nudging, and 256 assignments per layer and step are a noisy
  # sample (even uniform routing gives max/mean ~1.2 here).
  assert np.mean(imbalance[-10:]) < 1.35 and max(imbalance[-10:]) < 1.5, imbalance
  bias = np.asarray(state.model_state['moe_state']['blocks']['mlp']['bias'])
  assert (bias[:, 0] < 3.0 - 0.5).all()
  summary = stats.summary(jax.device_get(state.model_state))
  assert summary['layers'] == [1, 2] and len(summary['routing_bias_per_layer']) == 2

  # The bias is train state: it survives a checkpoint round trip exactly.
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(int(state.step), state, {'note': 'aux-free'})
  ckpt.wait()
  model = Transformer(cfg)
  tx = optax.sgd(0.0)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1, 'expert': 1}, jax.devices()[:1])
  abstract, shardings = state_shardings(model, tx, mesh, 16)
  restored, meta = ckpt.restore(int(state.step), abstract, shardings)
  ckpt.close()
  assert meta == {'note': 'aux-free'}
  np.testing.assert_array_equal(restored.model_state['moe_state']['blocks']['mlp']['bias'], bias)


def test_update_bias_is_per_layer():
  bias = jnp.zeros((2, 4))
  load = jnp.array([[10, 0, 0, 2], [3, 3, 3, 3]])
  np.testing.assert_allclose(balance.update_bias(bias, load, 0.1),
                             [[-0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0]])


def test_analytic_flops_count_the_experts_a_token_uses():
  from efficientjax.metrics.flops import analytic_flops_per_step
  cfg = dataclasses.replace(TINY, vocab_size=64)
  dense = dataclasses.replace(cfg, ffn='dense')
  e, f, moe = cfg.embed_dim, cfg.moe.expert_dim, cfg.moe
  # Per token, forward: layer 0 is dense (mlp_dim); layers 1-2 route to top_k experts of width
  # f, add the shared one, and compute router logits.
  moe_layer = 2 * e * moe.num_experts + 2 * 3 * e * f * (moe.top_k + moe.num_shared_experts)
  dense_layer = 2 * 3 * e * cfg.mlp_dim
  tokens = 2 * 16
  got = (analytic_flops_per_step(cfg, seq_len=16, batch=2)['matmul']
         - analytic_flops_per_step(dense, seq_len=16, batch=2)['matmul'])
  assert got == 3 * tokens * 2 * (moe_layer - dense_layer)


def test_gated_shared_expert_against_its_formula():
  """Qwen2-MoE's shared expert: one SwiGLU of width shared_expert_dim (not a multiple of the
  experts' width), scaled per token by sigmoid(x·w), added to the routed output; against plain
  jnp on the block's own params. Its FLOPs count the shared width and the gate."""
  from efficientjax.moe.layer import MoE
  cfg = _with(dataclasses.replace(TINY, num_layers=1), first_dense_layers=0, dispatch='dense',
              shared_expert_dim=24, shared_expert_gate=True)
  x = jax.random.normal(jax.random.key(5), (2, 7, 32))
  block = MoE(cfg)
  params = nn.unbox(block.init(jax.random.key(6), x)['params'])
  shared = params['shared']
  assert shared['gate']['kernel'].shape == (32, 24)
  assert params['shared_gate']['kernel'].shape == (32,)
  got = jax.jit(block.apply)({'params': params}, x)
  routed = jax.jit(MoE(_with(cfg, num_shared_experts=0, shared_expert_dim=None,
                             shared_expert_gate=False)).apply)(
      {'params': {k: v for k, v in params.items() if not k.startswith('shared')}}, x)
  swiglu = (jax.nn.silu(x @ shared['gate']['kernel']) * (x @ shared['up']['kernel'])
            ) @ shared['down']['kernel']
  want = routed + jax.nn.sigmoid(x @ params['shared_gate']['kernel'])[..., None] * swiglu
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  e, moe = 32, cfg.moe
  assert MoE.flops_per_token(cfg) == (2 * e * moe.num_experts + 2 * 3 * e * 16 * moe.top_k
                                      + 2 * 3 * e * 24 + 2 * e)
